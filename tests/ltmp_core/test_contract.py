"""A patched model keeps timm's model contract: it pickles (``pickle``, ``torch.save``) and trains with
activation checkpointing, in every mode (issue 27)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import ltmp_core
from tests.conftest import images, tiny_model

MODES = ["soft", "dynamic", "static"]
OPS = ["merge+prune", "squeeze", "merge", "prune"]


def patched(mode: str, arch: str = "deit_small", **kw) -> torch.nn.Module:
    model = tiny_model(arch, **kw)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=OPS, keep=[0.75, 0.7, 0.8, 0.6]), mode="static")
    ltmp_core.calibrate(model, images(8))
    return ltmp_core.set_mode(model, mode)


@pytest.mark.parametrize("mode", MODES)
def test_pickle_and_torch_save_round_trip(mode):
    model = patched(mode)
    x = images(4, seed=3)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert type(other) is type(model) and ltmp_core.is_patched(other)
        assert ltmp_core.get_mode(other) == mode and ltmp_core.get_plan(other) == ltmp_core.get_plan(model)
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        assert other.blocks[0]._ltmp is other._ltmp  # one state shared by the blocks, as before
        ltmp_core.remove_plan(other)
        assert type(other).__name__ == "VisionTransformer"


def test_a_pickled_model_carries_no_record_of_its_last_pass():
    model = patched("dynamic")
    with torch.no_grad():
        model(images(2))
    other = pickle.loads(pickle.dumps(model))
    with pytest.raises(ltmp_core.LTMPError, match="no forward pass"):
        ltmp_core.token_counts(other)


def _gradients(model: torch.nn.Module, x: torch.Tensor, checkpointing: bool) -> tuple[dict, torch.Tensor]:
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.square().mean()
    if ltmp_core.get_mode(model) == "soft":
        loss = loss + ltmp_core.flops_budget_loss(model, 0.5) + ltmp_core.layer_budget_loss(model)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, out.detach()


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_the_same_with_and_without_checkpointing(mode):
    model = patched(mode).train()  # dropout-free tiny model: train mode changes nothing but the flags
    x = images(4, seed=5)
    plain, out_plain = _gradients(model, x, False)
    counts = ltmp_core.token_counts(model).detach()
    ckpt, out_ckpt = _gradients(model, x, True)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert ckpt.keys() == plain.keys()
    if mode == "soft":
        assert "blocks.0.merge_threshold" in ckpt  # the thresholds learn through the checkpointed blocks
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # The record of the pass is the first forward's, not a recomputation's.
    torch.testing.assert_close(ltmp_core.token_counts(model).detach(), counts)


def test_checkpointing_set_before_the_plan_carries_over_and_back():
    model = tiny_model("deit_small")
    model.set_grad_checkpointing(True)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="merge", keep=0.7), mode="static")
    assert model.grad_checkpointing is False  # timm's own sequence checkpointing stays off
    out = model(images(2)).sum()
    out.backward()
    ltmp_core.remove_plan(model)
    assert model.grad_checkpointing is True
