"""Soft mode against LTMP's released training forward: masks, logits and threshold gradients.

LTMP's own code (github.com/Mxbonn/ltmp) is not a package here; give the path of a checkout with
``--released`` (or ``LTMP_RELEASED``). Its training block and attention (``ltmp/timm/lt_mergeprune.py``)
and its masker (``threshold_masking.py``) are loaded from there as they are, without the package's
``__init__`` (which needs wandb and the timm of 2023), and put on a copy of the same timm ViT: its
blocks get the released classes, its thresholds the same values. Both forwards run on the same
images in LTMP's training setting (``model.train()``: the epsilon softmax; the tiny models have no
dropout), and for each soft form of ltmp_core the script prints

- the largest absolute difference of the logits,
- per block, the fraction of (image, token) pairs whose hard mask agrees (tokens matched by the
  patch they started as: the released code reorders its sequence, ltmp_core keeps positions),
- per threshold, the gradients of a cross-entropy loss and of the summed masks (LTMP's budget term is
  a function of the mask means), and how many agree in sign and within 1e-3 relative.

The thresholds are calibrated once (ltmp_core.calibrate, dynamic mode) so that every block merges and
prunes about ``--keep`` of its tokens, then shared by both models.

    python benchmarks/ltmp_released.py --released /tmp/ltmp_released
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import types
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import ltmp_core


def load_released(root: Path) -> types.ModuleType:
    """The released ``lt_mergeprune`` module, loaded from its file under a stand-in package."""
    here = root / "ltmp" / "timm"
    if not (here / "lt_mergeprune.py").exists():
        raise SystemExit(f"--released: no ltmp/timm/lt_mergeprune.py under {root}")
    package = types.ModuleType("ltmp_released")
    package.__path__ = [str(here)]
    sys.modules["ltmp_released"] = package
    utils = types.ModuleType("ltmp_released.utils")
    utils.create_vision_transformer = None  # only its model factories use it
    sys.modules["ltmp_released.utils"] = utils
    for name in ("threshold_masking", "lt_mergeprune"):
        spec = importlib.util.spec_from_file_location(f"ltmp_released.{name}", here / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["ltmp_released.lt_mergeprune"]


def released_model(stock: torch.nn.Module, rel: types.ModuleType, values: dict, tau: float) -> torch.nn.Module:
    model = copy.deepcopy(stock)
    masker = sys.modules["ltmp_released.threshold_masking"].ThresholdMasker
    for i, block in enumerate(model.blocks):
        block.__class__ = rel.LTMPBlock
        block.attn.__class__ = rel.LTMPAttention
        block.merge_masker, block.prune_masker = masker(tau), masker(tau)
        with torch.no_grad():
            block.merge_masker.threshold.fill_(values["merge_threshold"][i])
            block.prune_masker.threshold.fill_(values["prune_threshold"][i])
    model.train()
    return model


def released_thresholds(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for b in model.blocks for p in (b.merge_masker.threshold, b.prune_masker.threshold)]


def run_released(model, rel, x):
    feats = rel.LTMPVisionTransformer.forward_features(model, x)
    logits = model.forward_head(feats)
    # The released sequence is cat([even, odd]) after every block: map each mask back to its patch.
    order = torch.arange(feats.shape[1])
    masks = []
    for m in model.masks:
        order = torch.cat([order[0::2], order[1::2]])
        masks.append(torch.empty_like(m).scatter_(1, order.expand_as(m), m))
    return logits, masks


def run_project(model, x):
    masks = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: masks.append(model._ltmp.last.alive)) for b in model.blocks]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, masks


def grads(loss, params):
    return [0.0 if g is None else float(g) for g in torch.autograd.grad(loss, params, retain_graph=True,
                                                                         allow_unused=True)]


def compare(stock, plan, rel, x, y, form: str) -> None:
    values = {name: [getattr(l, name) for l in plan.layers] for name in ("merge_threshold", "prune_threshold")}
    ours = ltmp_core.apply_plan(copy.deepcopy(stock), plan, mode="soft", soft_form=form)
    ours.train()
    theirs = released_model(stock, rel, values, plan.layers[0].tau)
    for p in list(ours.parameters()) + list(theirs.parameters()):
        p.requires_grad_(False)
    p_ours = [p for _, _, p in ltmp_core.thresholds(ours)]
    p_theirs = released_thresholds(theirs)
    for p in p_ours + p_theirs:
        p.requires_grad_(True)
    lo, mo = run_project(ours, x)
    lt, mt = run_released(theirs, rel, x)
    print(f"soft_form={form!r}: max |logit difference| {float((lo - lt).detach().abs().max()):.3g}")
    agree = [float(((a.detach() > 0.5) == (b.detach() > 0.5)).float().mean()) for a, b in zip(mo, mt)]
    print("  hard masks agree per block:", " ".join(f"{a:.4f}" for a in agree))
    for name, loss_o, loss_t in (("cross-entropy", F.cross_entropy(lo, y), F.cross_entropy(lt, y)),
                                 ("sum of masks", sum(m.mean(0).sum() for m in mo), sum(m.mean(0).sum() for m in mt))):
        go, gt = grads(loss_o, p_ours), grads(loss_t, p_theirs)
        sign = sum((a > 0) == (b > 0) for a, b in zip(go, gt) if a or b)
        close = sum(abs(a - b) <= 1e-3 * max(abs(a), abs(b), 1e-12) for a, b in zip(go, gt))
        nonzero = sum(1 for a, b in zip(go, gt) if a or b)
        print(f"  d({name})/d(thresholds): sign agrees {sign}/{nonzero}, within 1e-3 rel. {close}/{len(go)}")
        print("    ltmp_core:", " ".join(f"{g:+.4e}" for g in go))
        print("    released: ", " ".join(f"{g:+.4e}" for g in gt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--released", default=os.environ.get("LTMP_RELEASED"), help="a checkout of Mxbonn/ltmp")
    parser.add_argument("--keep", type=float, default=0.8, help="kept fraction the thresholds are calibrated to")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.released:
        raise SystemExit("give --released PATH (a checkout of github.com/Mxbonn/ltmp) or set LTMP_RELEASED")
    rel = load_released(Path(args.released))
    torch.manual_seed(args.seed)
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.img_size,
                              patch_size=args.patch_size, depth=args.depth, num_classes=10).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(args.seed + 1))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(args.seed + 2))
    plan = ltmp_core.make_plan(stock, op="merge+prune", keep=args.keep, merge_order="tome", importance="mean",
                               importance_scale="raw", tau=args.tau)
    calibrated = ltmp_core.calibrate(ltmp_core.apply_plan(copy.deepcopy(stock), plan, mode="static"), x)
    print(f"vit_tiny shrunk: depth {args.depth}, {args.img_size} px, patch {args.patch_size}; batch {args.batch}; "
          f"tau {args.tau}; thresholds calibrated to keep {args.keep}")
    for form in ltmp_core.SOFT_FORMS:
        compare(stock, calibrated, rel, x, y, form)


if __name__ == "__main__":
    main()
