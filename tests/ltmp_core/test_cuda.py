"""The same plans on a CUDA device as on the CPU: every reducer in every mode, FLOPs, dynamic packing,
soft-mode gradients, width cuts and CUDA graphs.

The reference is the CPU run of the same model, images and thresholds: fp32 on CUDA (TF32 off) must
keep the very same tokens and give the same outputs to float rounding; bf16 autocast must stay within
bf16's precision of it. These tests need a GPU and ``LTMP_TEST_DEVICE=cuda`` (the suite hides GPUs
otherwise, see conftest.py); ``benchmarks/device_check.py`` runs them with ``pytest -m cuda``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import ltmp_core
from tests.conftest import images, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        os.environ.get("LTMP_TEST_DEVICE") != "cuda" or not torch.cuda.is_available(),
        reason="needs a CUDA device and LTMP_TEST_DEVICE=cuda (benchmarks/device_check.py runs these)",
    ),
]

REDUCING_OPS = ["merge", "prune", "squeeze", "merge+prune", "merge+squeeze"]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on CUDA as on the CPU: no TF32 in matrix products or in the patch embedding's convolution."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def planned(arch: str, ops: list[str], mode: str, keep=(0.75, 0.7, 0.7, 0.6), importance: str = "mean"):
    """A tiny model with ``ops``, calibrated on the CPU, in ``mode``."""
    model = tiny_model(arch)
    plan = ltmp_core.make_plan(model, op=ops, keep=list(keep), importance=importance)
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8, seed=3))
    return ltmp_core.set_mode(model, mode)


def on_both(model: torch.nn.Module, x: torch.Tensor):
    """Outputs and token counts of ``model`` on the CPU and of a copy on CUDA."""
    gpu = copy.deepcopy(model).to(CUDA)
    with torch.no_grad():
        cpu_out = model(x)
        cpu_counts = ltmp_core.token_counts(model)
        gpu_out = gpu(x.to(CUDA))
        gpu_counts = ltmp_core.token_counts(gpu)
    return cpu_out, cpu_counts, gpu_out.cpu(), gpu_counts.cpu()


@pytest.mark.parametrize("importance", ["mean", "cls"])
@pytest.mark.parametrize("mode", ["static", "dynamic", "soft"])
@pytest.mark.parametrize("op", REDUCING_OPS)
def test_every_reducer_and_mode_on_cuda_equals_the_cpu(op, mode, importance):
    model = planned("deit_small", [op, "none", op, op], mode, importance=importance)
    cpu_out, cpu_counts, gpu_out, gpu_counts = on_both(model, images(6))
    assert torch.equal(gpu_counts, cpu_counts), "the same tokens survive on both devices"
    assert cpu_counts[-1].max() < cpu_counts[0].max(), "the plan removed tokens"
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["deit_small_distilled", "reg4_dinov2", "avg_pool", "qk_norm"])
def test_prefix_tokens_and_variants_on_cuda(arch):
    model = planned(arch, ["merge+prune", "squeeze", "merge", "merge+squeeze"], "dynamic")
    cpu_out, cpu_counts, gpu_out, gpu_counts = on_both(model, images(6))
    assert torch.equal(gpu_counts, cpu_counts)
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_bf16_autocast_stays_within_bf16_of_fp32(mode):
    """bf16 rounds scores, so a token on a threshold may go the other way; the pooled features stay
    close (compared before the head: a random head's logits are near zero). The bound is loose: in a
    random model attention is near uniform, so rounding reorders the prune scores (on the CPU, bf16
    autocast is 0.005 off for the stock model and 0.04-0.07 for this plan); on a trained model the
    device check compares top-1 on the proxy instead."""
    model = planned("deit_small", ["merge+prune", "squeeze", "merge", "merge+squeeze"], mode)
    x = images(16)

    def pooled(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.forward_head(m.forward_features(x), pre_logits=True).float().cpu()

    with torch.no_grad():
        reference = pooled(model, x)
    gpu = copy.deepcopy(model).to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = pooled(gpu, x.to(CUDA))
    relative = (got - reference).norm() / reference.norm()
    assert relative < 0.1, f"bf16 features are {relative:.3f} of the fp32 norm away"


def test_flops_on_cuda_equal_the_cpu():
    model = planned("deit_small", ["merge+prune", "squeeze", "merge", "prune"], "dynamic")
    x = images(12)
    gpu = copy.deepcopy(model).to(CUDA)
    cpu_macs, cpu_kept = ltmp_core.measure_flops(model, [x[:7], x[7:]])
    gpu_macs, gpu_kept = ltmp_core.measure_flops(gpu, [x[:7].to(CUDA), x[7:].to(CUDA)])
    assert gpu_macs == pytest.approx(cpu_macs, rel=1e-9)
    assert gpu_kept == pytest.approx(cpu_kept, rel=1e-9)
    ltmp_core.set_mode(model, "static")
    ltmp_core.set_mode(gpu, "static")
    assert ltmp_core.count_flops(gpu) == ltmp_core.count_flops(model)


def test_dynamic_packing_on_cuda_is_batch_invariant():
    """Images of different counts share one padded batch on the device; each gets what it gets alone."""
    gpu = planned("deit_small", ["merge+prune", "squeeze", "merge", "merge+squeeze"], "dynamic").to(CUDA)
    x = images(6).to(CUDA)
    with torch.no_grad():
        batched = gpu(x)
        counts = ltmp_core.token_counts(gpu)
        alone = torch.cat([gpu(x[i:i + 1]) for i in range(len(x))])
    assert (counts.max(dim=1).values > counts.min(dim=1).values).any(), "images kept different counts"
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_soft_mode_threshold_gradients_on_cuda_equal_the_cpu():
    def gradients(model: torch.nn.Module, device: torch.device) -> list[float]:
        thresholds = ltmp_core.threshold_parameters(model)
        ids = {id(p) for p in thresholds}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        x, y = images(8).to(device), (torch.arange(8) % 10).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y) + 10 * ltmp_core.flops_budget_loss(model, 0.4)
        loss.backward()
        return [float(p.grad) for p in thresholds]

    model = planned("deit_small", ["merge+prune", "squeeze", "merge", "prune"], "soft")
    gpu = copy.deepcopy(model).to(CUDA)
    cpu_grads, gpu_grads = gradients(model, torch.device("cpu")), gradients(gpu, CUDA)
    assert len(cpu_grads) == 5 and all(g != 0 for g in cpu_grads)
    assert gpu_grads == pytest.approx(cpu_grads, rel=1e-3, abs=1e-6)


def test_width_cut_on_cuda_keeps_what_the_cpu_keeps():
    """torch-pruning's Taylor ranking from CUDA gradients picks the same heads and units."""
    model = tiny_model("deit_small")
    plan = ltmp_core.make_plan(model, op="merge", keep=0.8, heads=[None, 2, 2, 1], mlp_hidden=[None, 96, 64, 96])
    x = images(16)
    gpu = copy.deepcopy(model).to(CUDA)
    ltmp_core.prune_width(model, plan, x)
    ltmp_core.prune_width(gpu, plan, x.to(CUDA))
    for name, p in model.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[name].cpu(), p, rtol=0, atol=0, msg=name)


def test_static_plan_under_cuda_graphs_equals_eager():
    """``torch.compile(mode="reduce-overhead")``, what ``search bench --compile`` runs on a GPU."""
    gpu = planned("deit_small", ["merge+prune", "squeeze", "merge", "merge+squeeze"], "static").to(CUDA)
    compiled = torch.compile(gpu, dynamic=False, mode="reduce-overhead")
    x = images(4).to(CUDA)
    with torch.no_grad():
        eager = gpu(x).clone()
        for _ in range(3):  # warm-up, record, replay
            got = compiled(x).clone()
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic", "soft"])
@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "dinov3", "siglip_map", "pe_core", "beit", "relpos_clsgap"])
def test_the_other_timm_families_on_cuda_equal_the_cpu(family, mode):
    """RoPE (Eva), relative position bias (BEiT, RelPos) and attention-pool heads on the device."""
    from tests.ltmp_core.test_families import calibrated

    model = calibrated(family, mode)
    cpu_out, cpu_counts, gpu_out, gpu_counts = on_both(model, images(6))
    assert torch.equal(gpu_counts, cpu_counts), "the same tokens survive on both devices"
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-4)
