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

__all__ = ["group_colour", "token_cell", "token_map", "kept_tokens_chart", "accuracy_flops_plot", "check_plot_path",
           "DIM", "OUTLINE", "SQUEEZE_MARK"]

#: A pruned patch keeps this fraction of its brightness (dimmed, still recognisable).
DIM = 0.3
OUTLINE = (255, 255, 255)
SQUEEZE_MARK = (255, 215, 0)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)

_OP_SHORT = {"none": "-", "merge": "merge", "prune": "prune", "squeeze": "squeeze", "merge+prune": "merge+prune",
             "merge+squeeze": "merge+squeeze"}


def group_colour(k: int) -> tuple[int, int, int]:
    """A distinct, saturated colour for the ``k``-th group (golden-ratio steps around the hue circle)."""
    r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * k) % 1.0, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def token_cell(image: Tensor, owner: Tensor, fate: Tensor, grid: tuple[int, int], scale: int) -> Image.Image:
    """One image drawn as its tokens after a block, as in ToMe's figures.

    Every token is one region: the patches merged into it are filled with their mean colour, and
    the region is outlined (a patch alone keeps its pixels); pruned patches are dimmed; squeezed
    patches carry the mean colour of the token they were fused into, with a diagonal mark.
    """
    import numpy as np

    rows, cols = grid
    h, w = image.shape[-2:]
    ph, pw = h // rows, w // cols
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy().astype(np.float64)
    out = pixels.copy()
    owners = owner.tolist()
    fates = fate.tolist()

    def patch(p: int) -> tuple[slice, slice]:
        r, c = divmod(p, cols)
        return slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw)

    groups: dict[int, list[int]] = {}
    for p, (o, f) in enumerate(zip(owners, fates)):
        if o >= 0 and f != PRUNED:
            groups.setdefault(o, []).append(p)
    for members in groups.values():
        if len(members) > 1:
            mean = np.mean([pixels[patch(p)].reshape(-1, 3).mean(0) for p in members], axis=0)
            for p in members:
                out[patch(p)] = mean
    for p, (o, f) in enumerate(zip(owners, fates)):
        if o < 0 or f == PRUNED:
            out[patch(p)] = pixels[patch(p)] * DIM
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB").resize((w * scale, h * scale),
                                                                                   Image.NEAREST)
    draw = ImageDraw.Draw(img)

    def token(p: int) -> int:
        return owners[p] if owners[p] >= 0 and fates[p] != PRUNED else -1 - p  # pruned patches: their own region

    for p in range(rows * cols):
        r, c = divmod(p, cols)
        x0, y0, x1, y1 = c * pw * scale, r * ph * scale, (c + 1) * pw * scale - 1, (r + 1) * ph * scale - 1
        if c + 1 < cols and token(p + 1) != token(p):
            draw.line((x1, y0, x1, y1), fill=OUTLINE)
        if r + 1 < rows and token(p + cols) != token(p):
            draw.line((x0, y1, x1, y1), fill=OUTLINE)
        if fates[p] == SQUEEZED and x1 - x0 >= 4:
            draw.line((x0 + 1, y1 - 1, x1 - 1, y0 + 1), fill=SQUEEZE_MARK, width=max(1, scale // 3))
    return img


def _legend(width: int, scale: int) -> Image.Image:
    """Swatches: a merged token, a pruned patch, a squeezed patch."""
    box = 5 * scale // 2 + 6
    img = Image.new("RGB", (width, box + 6), BACKGROUND)
    draw = ImageDraw.Draw(img)
    x = 2
    for kind, text in (("merged", "merged: one token, mean colour, outlined"), ("pruned", "pruned: dimmed"),
                       ("squeezed", "squeezed into a kept token: marked")):
        fill = {"merged": group_colour(0), "pruned": tuple(int(v * DIM) for v in group_colour(0)),
                "squeezed": group_colour(0)}[kind]
        draw.rectangle((x, 3, x + box, 3 + box), fill=fill, outline=OUTLINE if kind == "merged" else None)
        if kind == "squeezed":
            draw.line((x + 1, 2 + box, x + box - 1, 4), fill=SQUEEZE_MARK, width=max(1, scale // 3))
        draw.text((x + box + 4, 3 + box // 2 - 5), text, fill=TEXT)
        x += box + 10 + 6 * len(text)
    return img


def token_map(
    images: Tensor,
    trace: TokenTrace,
    depths: Sequence[int] | None = None,
    *,
    ops: Sequence[str] | None = None,
    scale: int = 4,
    gap: int = 4,
    legend: bool = True,
) -> Image.Image:
    """A grid of token maps: one row per image, the image then its tokens after each block in ``depths``.

    Args:
        images: Displayable images in [0, 1], ``[B, 3, H, W]`` (``StudyData.denormalize``).
        trace: :func:`ltmp_core.trace_tokens` of the same images.
        depths: Blocks to show (default: every block whose op reduces tokens, or every block when
            ``ops`` is not given).
        ops: The plan's op per block, named in the column titles.
    """
    depth = trace.owner.shape[0]
    if depths is None:
        depths = [i for i in range(depth) if ops is None or ops[i] != "none"] or list(range(depth))
    b, _, h, w = images.shape
    cell_w, cell_h = w * scale, h * scale
    header = 26
    width = (len(depths) + 1) * (cell_w + gap) - gap
    key = _legend(width, scale) if legend else None
    height = header + b * (cell_h + gap) - gap + (key.height + gap if key is not None else 0)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    titles = [("image", "")] + [(f"block {layer}", _OP_SHORT.get(ops[layer], ops[layer]) if ops else "")
                                for layer in depths]
    for j, (title, op) in enumerate(titles):
        draw.text((j * (cell_w + gap) + 2, 1), title, fill=TEXT)
        draw.text((j * (cell_w + gap) + 2, 13), op, fill=TEXT)
    for i in range(b):
        y = header + i * (cell_h + gap)
        pixels = (images[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        sheet.paste(Image.fromarray(pixels, "RGB").resize((cell_w, cell_h), Image.NEAREST), (0, y))
        for j, layer in enumerate(depths):
            cell = token_cell(images[i], trace.owner[layer, i], trace.fate[layer, i], trace.grid, scale)
            sheet.paste(cell, ((j + 1) * (cell_w + gap), y))
    if key is not None:
        sheet.paste(key, (0, height - key.height))
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
