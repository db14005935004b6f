"""Which of timm's ViT-like models ltmp_core patches, and whether it patches them right.

    python benchmarks/coverage.py                         # prints the table
    python benchmarks/coverage.py --write docs/coverage.md
    python benchmarks/coverage.py --filter 'eva*'         # some models only

Every architecture that ``timm.list_models(module=...)`` lists for the ViT-like modules below is built
with random weights at a tiny size (4 blocks, 64 px, width 64 where the model takes it; else its own
width) and classified:

- supported: an identity plan equals stock timm in soft, dynamic and static mode; a reducing plan
  (merge+prune, squeeze, merge, prune; keep 0.7) runs in static, dynamic (calibrated) and soft mode,
  soft mode's thresholds get gradients; ``count_flops`` equals PyTorch's counter for the stock model
  and the static plan, and ``measure_flops`` for one image in dynamic mode (within 1%).
- refused: ``apply_plan`` raises :class:`ltmp_core.LTMPError` with one line saying why.
- wrong: anything else (a mismatch, or an exception that is not an ``LTMPError``).
- not built: timm cannot build the model at a tiny size here (not counted against ltmp_core).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import timm
import torch

import ltmp_core

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.flop_reference import counted_macs, versions  # noqa: E402

MODULES = ("vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos", "vision_transformer_hybrid",
           "vision_transformer_sam", "naflexvit")
TRIES = (
    dict(depth=4, embed_dim=64, num_heads=4, img_size=64, num_classes=10),
    dict(depth=4, img_size=64, num_classes=10),
    dict(depth=4, num_classes=10),
)
OPS = ("merge+prune", "squeeze", "merge", "prune")


def build(name: str) -> torch.nn.Module | None:
    for kwargs in TRIES:
        try:
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, **kwargs).eval()
        except Exception:  # noqa: BLE001  (the next, larger try)
            continue
    return None


def _input(model: torch.nn.Module) -> torch.Tensor:
    """Three images of the size the model takes: its own, or (a model without a strict size, which
    wants whole patches) the largest multiple of the patch size within it."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None) or (64, 64)
    if not getattr(pe, "strict_img_size", True) and getattr(pe, "patch_size", None) is not None:
        size = [max(p, s // p * p) for s, p in zip(size, pe.patch_size)]
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, int(size[0]), int(size[1]), generator=g)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max()))))


def classify(model: torch.nn.Module) -> tuple[str, str]:
    """``(status, detail)`` of one model (see the module docstring)."""
    x = _input(model)
    family = type(model).__name__
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    try:
        plan = ltmp_core.make_plan(model, op=[OPS[i % 4] for i in range(depth)], keep=0.7)
        with torch.no_grad():
            stock = model(x)
        stock_macs = counted_macs(model, x[:1])
        ltmp_core.apply_plan(model, ltmp_core.make_plan(model, op="none"), mode="static")
    except ltmp_core.LTMPError as e:
        return "refused", str(e).splitlines()[0]
    with torch.no_grad():
        for mode in ltmp_core.MODES:
            ltmp_core.set_mode(model, mode)
            if not _close(model(x), stock):
                return "wrong", f"identity plan differs from stock in {mode} mode"
    ltmp_core.remove_plan(model)
    if ltmp_core.count_flops(model) != stock_macs:
        return "wrong", f"stock FLOPs {ltmp_core.count_flops(model)} != counter {stock_macs:.0f}"
    ltmp_core.apply_plan(model, plan, mode="static")
    with torch.no_grad():
        model(x)
    ours, counted = ltmp_core.count_flops(model), counted_macs(model, x[:1])
    if abs(ours - counted) > 1e-3 * counted:
        return "wrong", f"static FLOPs {ours} != counter {counted:.0f}"
    ltmp_core.calibrate(model, x)
    ltmp_core.set_mode(model, "dynamic")
    measured, _ = ltmp_core.measure_flops(model, [x[:1]])
    counted = counted_macs(model, x[:1])
    if abs(measured - counted) > 0.01 * counted:
        return "wrong", f"dynamic FLOPs {measured:.0f} != counter {counted:.0f}"
    ltmp_core.set_mode(model, "soft")
    (model(x).square().mean() + ltmp_core.flops_budget_loss(model, 0.5)).backward()
    if not all(p.grad is not None and torch.isfinite(p.grad) for p in ltmp_core.threshold_parameters(model)):
        return "wrong", "soft mode: thresholds without finite gradients"
    return "supported", f"{family}; the reducing plan costs {ours / stock_macs:.2f} of stock in static mode"


def fingerprint(model: torch.nn.Module) -> str:
    """What makes two tiny models the same to ltmp_core: their modules, every parameter's and buffer's
    name and shape, and the settings that are plain attributes (pooling, prefix tokens, image size).
    Many timm names differ in pretrained weights or preprocessing only; at a tiny size they are one
    model, classified once."""
    attrs = ("global_pool", "num_prefix_tokens", "no_embed_class", "dynamic_img_size", "pool_include_prefix",
             "rope_mixed")
    shapes = [(n, tuple(t.shape)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    return repr((type(model).__name__, str(model), shapes, [getattr(model, a, None) for a in attrs]))


def run(pattern: str) -> list[tuple[str, str, str, str]]:
    rows = []
    seen: dict[str, tuple[str, str, str]] = {}
    for module in MODULES:
        for name in timm.list_models(module=module):
            if not fnmatch.fnmatch(name, pattern):
                continue
            start = time.perf_counter()
            model = build(name)
            if model is None:
                rows.append((module, name, "not built", "timm cannot build it at a tiny size here"))
                continue
            key = fingerprint(model)
            if key in seen:
                first, status, detail = seen[key]
                rows.append((module, name, status, f"as {first} (the same tiny model)"))
                continue
            try:
                status, detail = classify(model)
            except Exception as e:  # noqa: BLE001  (a crash is a finding)
                status, detail = "wrong", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc(limit=3, file=sys.stderr)
            seen[key] = (name, status, detail)
            rows.append((module, name, status, detail))
            print(f"{time.perf_counter() - start:6.1f}s {status:<10} {name}: {detail}", file=sys.stderr, flush=True)
    return rows


def report(rows: list[tuple[str, str, str, str]], command: str) -> str:
    counts = Counter(status for _, _, status, _ in rows)
    built = len(rows) - counts["not built"]
    lines = [
        "# Coverage of timm's ViT-like models",
        "",
        f"Made by `{command}` ({versions()}). What each status means: the docstring of "
        "`benchmarks/coverage.py`. Random weights, tiny sizes (4 blocks, 64 px, width 64 where the model takes it).",
        "",
        f"**{counts['supported']}/{built} supported, {counts['refused']} refused with one line, "
        f"{counts['wrong']} wrong** ({counts['not built']} not built at a tiny size).",
        "",
        "| module | supported | refused | wrong |",
        "|---|---|---|---|",
    ]
    for module in MODULES:
        c = Counter(status for m, _, status, _ in rows if m == module)
        lines.append(f"| {module} | {c['supported']} | {c['refused']} | {c['wrong']} |")
    reasons = Counter(detail for _, _, status, detail in rows if status == "refused" and not detail.startswith("as "))
    lines += ["", "## Why models are refused", "", "| models (distinct tiny models) | reason |", "|---|---|"]
    lines += [f"| {n} | {reason} |" for reason, n in reasons.most_common()]
    lines += ["", "## Every model", "", "| model | status | detail |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {detail} |" for _, name, status, detail in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="*", help="fnmatch pattern of model names (default: all)")
    parser.add_argument("--write", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args.filter)
    command = "python benchmarks/coverage.py" + (f" --filter '{args.filter}'" if args.filter != "*" else "")
    text = report(rows, command)
    if args.write:
        args.write.write_text(text)
    print(text)
    if any(status == "wrong" for _, _, status, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
