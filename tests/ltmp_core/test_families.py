"""The timm families beyond the plain VisionTransformer (issue 27): Eva (rotary position embeddings,
SwiGLU MLPs, EvaAttention's and AttentionRope's options), relative position bias (Beit,
VisionTransformerRelPos) and attention-pool heads (SigLIP's ``global_pool='map'``, PE-core).
Identity plans equal stock timm, reducing plans run in every mode, FLOPs equal PyTorch's counter,
every surviving token keeps its own position, and the pool weighs a merged token as the tokens it
stands for."""

from __future__ import annotations

import pickle

import pytest
import torch

import ltmp_core
from tests.conftest import assert_grouped_attention_equals_padded, counted_macs, images, tiny_timm

#: Tiny members of each family: (timm name, extra kwargs).
FAMILIES = {
    "eva02": ("eva02_tiny_patch14_224", {}),  # EvaAttention (q/v biases), SwiGLU (GluMlp), 2-D RoPE, avg pool
    "eva02_swiglu_qknorm": ("eva02_tiny_patch14_224", {"swiglu_mlp": True, "scale_mlp": True, "qk_norm": True,
                                                         "scale_attn_inner": True, "qkv_fused": False}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),  # AttentionRope, a rotary table per head and block
    "dinov3": ("vit_small_patch16_dinov3", {}),  # 4 registers + class token, LayerScale, DINOv3 RoPE
    "siglip_map": ("vit_base_patch16_siglip_224", {}),  # VisionTransformer, no class token, attention pool
    "siglip_map_reg": ("vit_small_patch16_224", {"global_pool": "map", "reg_tokens": 2}),  # pool skips prefix
    "pe_core": ("vit_pe_core_tiny_patch16_384", {}),  # Eva + RoPE + class token + attention pool over all
    "beit": ("beit_base_patch16_224", {}),  # relative position bias per block (prefix rows), LayerScale gammas
    "beitv2_shared": ("beitv2_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}),
    "relpos_clsgap": ("vit_relpos_base_patch16_clsgap_224", {}),  # RelPosMlp with a class token, avg pool
    "srelpos": ("vit_srelpos_small_patch16_224", {}),  # one shared RelPosMlp for every block
}
ROPE = ["dinov3", "eva02", "eva02_swiglu_qknorm", "pe_core", "rope_mixed"]
MODES = ["soft", "dynamic", "static"]
OPS = ["merge+prune", "squeeze", "merge", "prune"]


def family_model(family: str, *, fused: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    return tiny_timm(*FAMILIES[family], fused=fused, seed=seed, **overrides)


def calibrated(family: str, mode: str, ops=OPS, keep=(0.75, 0.7, 0.8, 0.6), **kw) -> torch.nn.Module:
    model = family_model(family, **kw)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=list(ops), keep=list(keep)), mode="static")
    ltmp_core.calibrate(model, images(8))
    return ltmp_core.set_mode(model, mode)


@pytest.mark.parametrize(("mode", "fused"), [("soft", True), ("dynamic", True), ("static", True), ("static", False)],
                         ids=["soft", "dynamic", "static", "static-unfused"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_plan_equals_stock(family, mode, fused):
    model = family_model(family, fused=fused)
    x = images(3)
    with torch.no_grad():
        expected = model(x)
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"), mode=mode)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ltmp_core.remove_plan(model)
    assert not ltmp_core.is_patched(model) and not type(model.blocks[0]).__name__.startswith("LTMP")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flops_equal_pytorch_counter_stock_and_static(family):
    model = family_model(family)
    x = images(1)
    assert ltmp_core.count_flops(model) == counted_macs(model, x)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=OPS, keep=0.7), mode="static")
    assert ltmp_core.count_flops(model) == pytest.approx(counted_macs(model, x), rel=1e-6)


@pytest.mark.parametrize(("family", "fused"), [(f, True) for f in sorted(FAMILIES)] + [("eva02", False)],
                         ids=[*sorted(FAMILIES), "eva02-unfused"])
def test_dynamic_flops_and_batch_invariance(family, fused):
    model = calibrated(family, "dynamic", fused=fused)
    x = images(3, seed=11)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    measured, _ = ltmp_core.measure_flops(model, [x[i:i + 1] for i in range(3)])
    assert measured == pytest.approx(sum(counted_macs(model, x[i:i + 1]) for i in range(3)) / 3, rel=0.01)


@pytest.mark.parametrize("family", ["eva02", "relpos_clsgap", "beit"])
def test_dynamic_attention_in_length_groups_with_positions(family, monkeypatch):
    """Rotary tables and relative position biases are cut with the keys when a group is cut to its length."""
    model = family_model(family).double()  # `cls` importance: every block runs the fused attention
    with torch.no_grad():
        for name, table in model.named_parameters():
            if "relative_position_bias_table" in name:  # BEiT starts it at zero: a bias cut wrongly would not show
                table.normal_(generator=torch.Generator().manual_seed(0))
    plan = ltmp_core.make_plan(model, op=["prune", "merge", "squeeze", "merge+prune"], keep=[0.7, 0.7, 0.7, 0.6],
                               importance="cls")
    ltmp_core.apply_plan(model, plan, mode="static")
    ltmp_core.calibrate(model, images(8).double())
    ltmp_core.set_mode(model, "dynamic")
    assert_grouped_attention_equals_padded(model, images(6, seed=11).double(), monkeypatch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_soft_mode_trains_the_thresholds(family):
    model = calibrated(family, "soft").train()
    loss = model(images(4)).square().mean() + ltmp_core.flops_budget_loss(model, 0.4)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in ltmp_core.threshold_parameters(model))


def _pruned_in_block_0(model: torch.nn.Module) -> tuple[list, torch.Tensor]:
    """Static plan: block 0 prunes half the patches, blocks 1-3 reduce nothing. The NLC outputs of
    blocks 0 and 3 (prefix tokens apart, when there are any) on two images, and for each patch the
    position of its token after block 0, or -1 (``[B, 16]``)."""
    plan = ltmp_core.make_plan(model, op=["prune", "none", "none", "none"], keep=[0.5, 1, 1, 1])
    ltmp_core.apply_plan(model, plan, mode="static")
    x = images(2, seed=3)
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[0, 3], output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=model.num_prefix_tokens > 0)
        owner = ltmp_core.trace_tokens(model, x).owner[0]
    return after, owner


@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "dinov3"])
def test_survivors_keep_their_own_rotary_position(family):
    """Block 0 prunes; blocks 1-3 reduce nothing. Their output must be stock timm's blocks run on the
    survivors with each survivor's own row of the rotary table."""
    model = family_model(family)
    after, owner = _pruned_in_block_0(model)
    npt = model.num_prefix_tokens
    tokens = torch.cat([after[0][1], after[0][0]], dim=1)  # prefix, then the 8 surviving patch tokens
    patch_of = torch.full((2, 8), -1, dtype=torch.long)
    for b in range(2):
        for patch in range(16):
            if owner[b, patch] >= 0:
                patch_of[b, owner[b, patch] - npt] = patch
    assert (patch_of >= 0).all() and not (patch_of == torch.arange(8)).all()  # survivors moved in the sequence
    ltmp_core.remove_plan(model)
    rope = model.rope.get_embed(shape=model.patch_embed.grid_size) if not model.rope_mixed else model.rope.get_embed()
    with torch.no_grad():
        y = tokens
        for i in (1, 2, 3):
            table = rope[i] if model.rope_mixed else rope  # [H, P, D] per block, or [P, D]
            rows = table[:, patch_of].transpose(0, 1) if table.dim() == 3 else table[patch_of].unsqueeze(1)
            y = model.blocks[i](y, rope=rows)
    torch.testing.assert_close(torch.cat([after[1][1], after[1][0]], dim=1), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["beit", "beitv2_shared", "relpos_clsgap", "srelpos"])
def test_survivors_keep_their_own_relative_position_bias(family, monkeypatch):
    """Block 0 prunes; blocks 1-3 reduce nothing. Their output must be stock timm's blocks run on the
    survivors with the bias read at the survivors' own rows and columns."""
    model = family_model(family)
    after, owner = _pruned_in_block_0(model)
    npt = model.num_prefix_tokens
    split = (lambda t: torch.cat([t[1], t[0]], dim=1)) if npt else (lambda t: t)
    seq = torch.arange(npt).expand(2, npt).tolist()  # the prefix keeps its place
    for b in range(2):
        kept = sorted((int(owner[b, patch]), patch) for patch in range(16) if owner[b, patch] >= 0)
        seq[b] = seq[b] + [npt + patch for _, patch in kept]
    idx = torch.tensor(seq)  # [B, N]: where each surviving token stood in block 0's sequence
    ltmp_core.remove_plan(model)

    def gathered(full: torch.Tensor) -> torch.Tensor:
        table = full.reshape(-1, *full.shape[-2:])
        return table[:, idx[:, :, None], idx[:, None, :]].transpose(0, 1)

    with torch.no_grad():
        y = split(after[0])
        for i in (1, 2, 3):
            block = model.blocks[i]
            if family.startswith("beit"):
                shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
                if block.attn.relative_position_bias_table is not None:
                    own = gathered(block.attn._get_rel_pos_bias())
                    monkeypatch.setattr(block.attn, "_get_rel_pos_bias", lambda own=own: own)
                y = block(y, shared_rel_pos_bias=None if shared is None else gathered(shared))
            else:
                shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
                if block.attn.rel_pos is not None:
                    own = gathered(block.attn.rel_pos.get_bias())
                    monkeypatch.setattr(block.attn.rel_pos, "get_bias", lambda own=own: own)
                y = block(y, shared_rel_pos=None if shared is None else gathered(shared))
    torch.testing.assert_close(split(after[1]), y, rtol=1e-5, atol=1e-5)


def test_merged_tokens_rotate_as_their_destination():
    """In a merge, the destination keeps its place and its rotary row; the source's row goes with it."""
    model = calibrated("eva02", "static", ops=["merge", "none", "none", "none"], keep=[0.5, 1, 1, 1])
    x = images(1, seed=2)
    with torch.no_grad():
        model(x)
    st = model._ltmp
    pos = st.last.pos[0, model.num_prefix_tokens:] - model.num_prefix_tokens  # the patch each token sits at
    trace = ltmp_core.trace_tokens(model, x)
    for j, patch in enumerate(pos.tolist()):
        assert trace.owner[0][0, patch] == j + model.num_prefix_tokens  # the token at its own patch's place


@pytest.mark.parametrize("family", ["eva02", "dinov3"])
def test_dynamic_image_size(family):
    model = family_model(family, dynamic_img_size=True)
    x = images(1, size=48)
    assert ltmp_core.count_flops(model, img_size=48) == counted_macs(model, x)
    ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op=OPS, keep=0.7), mode="static")
    assert ltmp_core.count_flops(model, img_size=48) == pytest.approx(counted_macs(model, x), rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_pickling_and_checkpointing(mode):
    model = calibrated("dinov3", mode)
    x = images(2, seed=4)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected, rtol=0, atol=0)
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        grads.append(model.blocks[1].attn.proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["siglip_map", "siglip_map_reg"])
def test_the_attention_pool_weighs_a_merged_token_as_the_tokens_it_stands_for(family, mode):
    """ToMe's invariant through the pool: two identical tokens merged into one of size 2 pool as the two."""
    from tests.ltmp_core.test_patch import with_duplicate_patches

    model = family_model(family)
    pairs = [(0, 1), (6, 7), (12, 13)]  # (destination, source) in the bipartite split
    x = with_duplicate_patches(model, pairs)
    n = model.patch_embed.num_patches
    with torch.no_grad():
        expected = model(x)
        plan = ltmp_core.make_plan(model, op=["none", "none", "none", "merge"], keep=[1, 1, 1, (n - 3) / n])
        ltmp_core.apply_plan(model, plan.with_layers(merge_threshold=[None, None, None, 0.99999]), mode=mode)
        got = model(x)
    assert ltmp_core.token_counts(model)[-1, 0] == model.num_prefix_tokens + n - 3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_attention_pool_masks_padding_in_a_dynamic_batch():
    model = calibrated("siglip_map", "dynamic", keep=(0.5, 0.7, 0.8, 0.6))
    x = images(4, seed=9)
    with torch.no_grad():
        batched = model(x)
        counts = ltmp_core.token_counts(model)[-1]
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert len(set(counts.tolist())) > 1  # the images keep different counts: the batch is padded
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_width_cuts_are_refused_for_eva():
    model = family_model("eva02")
    plan = ltmp_core.make_plan(model, op="none", heads=2)
    with pytest.raises(ltmp_core.LTMPError, match="keeps its width"):
        ltmp_core.prune_width(model, plan)
