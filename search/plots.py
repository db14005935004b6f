"""Pictures of a search: token maps (Pillow), kept tokens per layer and accuracy vs FLOPs (matplotlib).

``ltmp_core`` only says which token went where (:func:`ltmp_core.trace_tokens`); drawing is here.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw
from torch import Tensor

from ltmp_core import PRUNED, SQUEEZED, LTMPError, TokenTrace

__all__ = ["group_colour", "token_map", "kept_tokens_chart", "accuracy_flops_plot", "PRUNED_COLOUR"]

PRUNED_COLOUR = (96, 96, 96)  # grey with a light cross: visible on black backgrounds and on photos
PRUNED_MARK = (200, 200, 200)
ALPHA = 0.6


def group_colour(k: int) -> tuple[int, int, int]:
    """A distinct, saturated colour for the ``k``-th group (golden-ratio steps around the hue circle)."""
    r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * k) % 1.0, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def _blend(a: tuple[int, int, int], b: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    return tuple(int(round((1 - alpha) * x + alpha * y)) for x, y in zip(a, b))  # type: ignore[return-value]


def token_cell(image: Tensor, owner: Tensor, fate: Tensor, grid: tuple[int, int], scale: int) -> Image.Image:
    """One image with its patches painted by where they went.

    Patches held alone are left as they are; patches merged together share one colour per group;
    pruned patches are grey with a cross; squeezed patches carry their group's colour with a diagonal
    stripe.
    """
    rows, cols = grid
    h, w = image.shape[-2:]
    ph, pw = h // rows, w // cols
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(pixels, "RGB").resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    owners = owner.tolist()
    sizes: dict[int, int] = {}
    for o in owners:
        if o >= 0:
            sizes[o] = sizes.get(o, 0) + 1
    order = {o: k for k, o in enumerate(sorted(o for o, n in sizes.items() if n > 1))}
    base = img.copy()
    for p, (o, f) in enumerate(zip(owners, fate.tolist())):
        r, c = divmod(p, cols)
        x0, y0 = c * pw * scale, r * ph * scale
        x1, y1 = x0 + pw * scale, y0 + ph * scale  # exclusive
        if o < 0 or f == PRUNED:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=PRUNED_COLOUR)
            if x1 - x0 >= 6:
                draw.line((x0 + 1, y0 + 1, x1 - 2, y1 - 2), fill=PRUNED_MARK)
                draw.line((x0 + 1, y1 - 2, x1 - 2, y0 + 1), fill=PRUNED_MARK)
            continue
        if sizes[o] <= 1 and f != SQUEEZED:
            continue
        colour = group_colour(order.get(o, len(order)))
        patch = base.crop((x0, y0, x1, y1))
        img.paste(Image.blend(patch, Image.new("RGB", patch.size, colour), ALPHA), (x0, y0))
        if f == SQUEEZED:
            draw.line((x0, y1 - 1, x1 - 1, y0), fill=(255, 255, 255), width=max(1, scale // 2))
    return img


def token_map(
    images: Tensor,
    trace: TokenTrace,
    depths: Sequence[int] | None = None,
    *,
    scale: int = 4,
    gap: int = 4,
) -> Image.Image:
    """A grid of token maps: one row per image, the image then its map after each block in ``depths``.

    Args:
        images: Displayable images in [0, 1], ``[B, 3, H, W]`` (``StudyData.denormalize``).
        trace: :func:`ltmp_core.trace_tokens` of the same images.
        depths: Blocks to show (default: about a third, two thirds and the last).
    """
    depth = trace.owner.shape[0]
    if depths is None:
        depths = sorted({max(0, round(depth * k / 3) - 1) for k in (1, 2, 3)})
    b, _, h, w = images.shape
    cell_w, cell_h = w * scale, h * scale
    header = 14
    sheet = Image.new("RGB", ((len(depths) + 1) * (cell_w + gap) - gap, header + b * (cell_h + gap) - gap),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(["image"] + [f"after block {layer}" for layer in depths]):
        draw.text((j * (cell_w + gap) + 2, 1), title, fill=(0, 0, 0))
    for i in range(b):
        y = header + i * (cell_h + gap)
        pixels = (images[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        sheet.paste(Image.fromarray(pixels, "RGB").resize((cell_w, cell_h), Image.NEAREST), (0, y))
        for j, layer in enumerate(depths):
            cell = token_cell(images[i], trace.owner[layer, i], trace.fate[layer, i], trace.grid, scale)
            sheet.paste(cell, ((j + 1) * (cell_w + gap), y))
    return sheet


def kept_tokens_chart(kept: Sequence[float], keeps: Sequence[float], num_patches: int, num_prefix: int,
                      ops: Sequence[str], path: str) -> None:
    """Mean tokens after each block against the plan's budget (tokens if every block kept its share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, n = [], float(num_patches)
    for k in keeps:
        n *= k
        budget.append(num_prefix + n)
    layers = list(range(len(kept)))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(kept) + 2), 3.0), dpi=100)
    ax.bar(layers, kept, color="#4c72b0", label="mean tokens kept (held-out images)")
    ax.plot(layers, budget, color="#dd8452", marker="o", label="budget")
    ax.set_xticks(layers, [f"{i}\n{o.replace('merge', 'M').replace('prune', 'P').replace('squeeze', 'S')}"
                           if o != "none" else f"{i}\n-" for i, o in enumerate(ops)], fontsize=7)
    ax.set_xlabel("block and operation")
    ax.set_ylabel("tokens")
    ax.set_ylim(0, num_patches + num_prefix)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_plot_path(path: str) -> None:
    """A picture file matplotlib can write: a known suffix, in a folder that exists."""
    from matplotlib.figure import Figure

    p = Path(path)
    kinds = Figure().canvas.get_supported_filetypes()
    suffix = p.suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise LTMPError(f"--plot: cannot draw a {p.suffix or 'suffix-less'} file; use one of "
                        f"{', '.join('.' + k for k in ('png', 'svg', 'pdf') if k in kinds)}")
    if not p.parent.is_dir():
        raise LTMPError(f"--plot: no folder {p.parent} (create it first)")


def accuracy_flops_plot(points: Sequence[tuple[float, float, bool, int]], target: float, path: str,
                        title: str = "") -> None:
    """Top-1 against measured FLOPs ratio for every complete trial, the feasible front and the target.

    ``points``: ``(flops_ratio, accuracy, feasible, trial_number)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    feasible = [p for p in points if p[2]]
    other = [p for p in points if not p[2]]
    if other:
        ax.scatter([p[0] for p in other], [100 * p[1] for p in other], c="#c44e52", marker="x", label="over the target")
    if feasible:
        ax.scatter([p[0] for p in feasible], [100 * p[1] for p in feasible], c="#4c72b0", label="feasible")
        front, best = [], -1.0
        for p in sorted(feasible):
            if p[1] > best:
                front.append(p)
                best = p[1]
        ax.step([p[0] for p in front], [100 * p[1] for p in front], where="post", c="#55a868", label="feasible front")
    ax.axvline(target, color="#8172b2", linestyle="--", label=f"target {target:g}")
    ax.set_xlabel("measured FLOPs ratio (MACs / unreduced MACs)")
    ax.set_ylabel("held-out top-1 (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
