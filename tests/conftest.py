"""Shared fixtures: tiny timm ViTs (32 px, patch 8, 4 blocks) of every supported family."""

from __future__ import annotations

import os

# The suite is a CPU suite: it compares figures exactly (fp32, deterministic kernels) and must give the
# same answers on a machine with a GPU. Hide any GPU before torch looks, also from worker processes
# the tests start, so that `--device auto` resolves to the CPU. GPU figures come from benchmarks/.
# `LTMP_TEST_DEVICE=cuda pytest -m cuda` keeps the GPU for the tests marked `cuda` (they compare the
# device with the CPU; benchmarks/device_check.py runs them).
if os.environ.get("LTMP_TEST_DEVICE", "cpu") != "cuda":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import ltmp_core  # noqa: E402

from tests.flop_reference import counted_macs, versions  # noqa: E402,F401  (re-exported for the tests)

# Property tests draw the same examples on every run, so a CI result can be reproduced and does not
# depend on luck; `HYPOTHESIS_PROFILE=explore pytest tests` draws fresh examples.
# A failure found that way gets pinned with @example next to the test.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Small enough that a forward pass takes milliseconds on 2 cores.
TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3, num_classes=10)

#: Every architecture family ltmp_core promises to patch: (timm name, extra kwargs).
ARCHITECTURES = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {"init_values": 0.1}),  # LayerScale, no_embed_class
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.1}),  # 4 register tokens
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "avg_pool": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
}


def tiny_model(arch: str = "deit_small", *, fused: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of ``arch`` in eval mode."""
    return tiny_timm(*ARCHITECTURES[arch], fused=fused, seed=seed, **overrides)


def tiny_timm(name: str, extra: dict, *, fused: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """timm's ``name`` at the tiny size (:data:`TINY`) with ``extra`` and ``overrides``, randomly
    initialised with ``seed``, in eval mode, fused attention on or off."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **extra, **overrides}).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def images(n: int = 6, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def assert_grouped_attention_equals_padded(model: torch.nn.Module, x: torch.Tensor, monkeypatch) -> None:
    """A dynamic-mode ``model``'s fused attention over a padded batch, run per image (the CPU's rule), in
    groups of similar length (an accelerator's rule) or in two interleaved groups, gives the outputs and
    token counts of one call over the whole padded batch with the padding masked (run ``model`` in
    float64: then equal to 1e-10, and no threshold decision can flip on rounding)."""
    from ltmp_core import attention

    real = attention.length_groups
    ways = {
        "padded": lambda lengths, *_, **__: [(list(range(len(lengths))), max(lengths))],
        "per image": real,
        "groups": lambda lengths, *_, **__: real(lengths, 0.1),
        "interleaved": lambda lengths, *_, **__: [([i for i in range(len(lengths)) if i % 2 == j],
                                                     max(lengths[j::2])) for j in (0, 1)],
    }
    out, counts = {}, {}
    for name, rule in ways.items():
        monkeypatch.setattr(attention, "length_groups", rule)
        with torch.no_grad():
            out[name] = model(x)
        counts[name] = ltmp_core.token_counts(model)
    c = counts["padded"]
    assert (c.max(dim=1).values > c.min(dim=1).values).any(), "images kept different counts (padding)"
    for name in ways:
        assert torch.equal(counts[name], c), name
        torch.testing.assert_close(out[name], out["padded"], rtol=0, atol=1e-10, msg=name)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


def pytest_report_header(config) -> str:
    """The releases this run used, first thing in the output (a red run says what it ran on)."""
    return f"versions: {versions()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every failure report names the releases too, beside its traceback."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("versions", versions()))
