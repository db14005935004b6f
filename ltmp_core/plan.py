"""Reduction plans: which operation each block applies and how many tokens it keeps.

A :class:`ReductionPlan` is the export format of a search and the input of :func:`apply_plan`. It is
a frozen dataclass with a versioned JSON form (:func:`save_plan` / :func:`load_plan`) that carries
the model name and its token geometry.

Budgets: ``keep`` of a layer is the fraction of its input *patch* tokens left after its reduction
(prefix tokens - class, distillation, registers - are never reduced and not counted). For the
combined operations, ``merge_keep`` is the fraction left after the merge stage; the prune or
squeeze stage then brings it down to ``keep``.

Width: ``heads`` and ``mlp_hidden`` of a layer are the attention heads and MLP hidden units its block
keeps (``None``: all of the model's). A plan that cuts width is applied to a model whose width was
cut to match (:func:`ltmp_core.prune_width`); its FLOPs count the narrower blocks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from .errors import LTMPError
from .files import write_atomic
from .geometry import ViTGeometry

if TYPE_CHECKING:  # the plan vocabulary and its JSON form import without torch (fast command-line checks)
    import torch.nn as nn
    from torch import Tensor

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "OPS",
    "IMPORTANCE",
    "MERGE_ORDERS",
    "SQUEEZE_HOSTS",
    "IMPORTANCE_SCALES",
    "LayerPlan",
    "ReductionPlan",
    "make_plan",
    "save_plan",
    "load_plan",
    "stage_counts",
    "static_stages",
    "kept_count",
    "lowest_keep",
    "measured_plan",
    "WIDTH_FIELDS",
    "WIDTH_IMPORTANCE",
]

FORMAT = "ltmp-plan"
FORMAT_VERSION = 3
#: Versions :func:`load_plan` reads: version 1 plans are version 2 plans with the default variants, and
#: version 2 plans are version 3 plans that keep every block's full width.
READABLE_VERSIONS = (1, 2, 3)
#: Layer fields that version 3 added: a plan of an older version cannot carry them.
WIDTH_FIELDS = ("heads", "mlp_hidden")

#: Operation name -> the reducer stages it runs, in order (see ``ltmp_core.reducers.REDUCERS``).
OPS: dict[str, tuple[str, ...]] = {
    "none": (),
    "merge": ("merge",),
    "prune": ("prune",),
    "squeeze": ("squeeze",),
    "merge+prune": ("merge", "prune"),
    "merge+squeeze": ("merge", "squeeze"),
}

#: A bipartite merge pairs each token of one half with the other half, so it removes at most half.
MIN_MERGE_KEEP = 0.5

#: LTMP's temperature of the sigmoid threshold mask.
DEFAULT_TAU = 0.1

#: Importance scores of prune and squeeze: LTMP's mean attention received, or the class token's.
IMPORTANCE = ("mean", "cls")

#: Token order after a merge: ``keep`` (the input order; the split alternates over the live patch
#: tokens) or ``tome`` (ToMe's and LTMP's: unmerged sources, then destinations; the split alternates
#: over the whole sequence, prefix tokens included).
MERGE_ORDERS = ("keep", "tome")

#: Where a squeezed token goes and with what weight: ``keys`` (this project: the most similar kept
#: token by attention keys, weights times token sizes, the host's size grows) or ``tps`` (TPS: by
#: cosine similarity of the token features, weights e and exp(similarity) without sizes).
SQUEEZE_HOSTS = ("keys", "tps")

#: How :func:`ltmp_core.prune_width` ranks the heads and MLP hidden units it cuts: torch-pruning's
#: first-order Taylor criterion on a calibration batch, the weights' L2 magnitude, or at random.
WIDTH_IMPORTANCE = ("taylor", "magnitude", "random")

#: Units of the prune threshold: ``relative`` (importance times the live token count: 1 is an average
#: token in every image and layer) or ``raw`` (LTMP's: the mean attention received itself, about 1/n).
IMPORTANCE_SCALES = ("relative", "raw")


def _number(value: Any, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LTMPError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise LTMPError(f"{name}: must be finite, got {value}")
    return value


@dataclass(frozen=True)
class LayerPlan:
    """What one transformer block does to its tokens.

    Attributes:
        op: One of :data:`OPS`.
        keep: Fraction of the block's input patch tokens left after it, in (0, 1]; 1 for ``none``.
        merge_keep: For ``merge+prune`` / ``merge+squeeze``, the fraction left after the merge
            stage (between ``keep`` and 1, at least 0.5). ``None`` splits the cut evenly:
            ``max(0.5, sqrt(keep))``.
        merge_threshold: Learned cosine-similarity threshold above which a token is merged.
        prune_threshold: Learned importance threshold below which a token is pruned or squeezed.
        tau: Temperature of the sigmoid threshold mask used in soft (training) mode.
        importance: How prune and squeeze score tokens: ``mean`` (LTMP: mean attention received,
            needs the full attention map) or ``cls`` (the class token's attention, computed from the
            class query alone, so the block can use fused attention).
        merge_order: :data:`MERGE_ORDERS`: the token order after a merge and the split's parity.
        squeeze_host: :data:`SQUEEZE_HOSTS`: how a squeezed token finds and joins its host.
        importance_scale: :data:`IMPORTANCE_SCALES`: the units of ``prune_threshold``.
        heads: Attention heads the block keeps (whole heads); ``None`` keeps all of them.
        mlp_hidden: Hidden units of the block's MLP it keeps; ``None`` keeps all of them.
    """

    op: str = "none"
    keep: float = 1.0
    merge_keep: float | None = None
    merge_threshold: float | None = None
    prune_threshold: float | None = None
    tau: float = DEFAULT_TAU
    importance: str = "mean"
    merge_order: str = "keep"
    squeeze_host: str = "keys"
    importance_scale: str = "relative"
    heads: int | None = None
    mlp_hidden: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or self.op not in OPS:
            raise LTMPError(f"op: unknown operation {self.op!r} (choose from {', '.join(OPS)})")
        keep = _number(self.keep, "keep")
        if not 0.0 < keep <= 1.0:
            raise LTMPError(f"keep: must be in (0, 1], got {keep}")
        if self.op == "none" and keep != 1.0:
            raise LTMPError(f"keep: must be 1 for op 'none', got {keep}")
        if self.op == "merge" and keep < MIN_MERGE_KEEP:
            raise LTMPError(f"keep: a merge removes at most half of the tokens, so keep must be >= 0.5, got {keep}")
        merge_keep = _number(self.merge_keep, "merge_keep", optional=True)
        if merge_keep is not None:
            if self.op not in ("merge+prune", "merge+squeeze"):
                raise LTMPError(f"merge_keep: only used by merge+prune and merge+squeeze, not {self.op!r}")
            if not (max(keep, MIN_MERGE_KEEP) <= merge_keep <= 1.0):
                raise LTMPError(
                    f"merge_keep: must be between max(keep, 0.5) = {max(keep, MIN_MERGE_KEEP)} and 1, got {merge_keep}"
                )
        tau = _number(self.tau, "tau")
        if tau <= 0:
            raise LTMPError(f"tau: must be > 0, got {tau}")
        for name, table in (("importance", IMPORTANCE), ("merge_order", MERGE_ORDERS),
                            ("squeeze_host", SQUEEZE_HOSTS), ("importance_scale", IMPORTANCE_SCALES)):
            if getattr(self, name) not in table:
                raise LTMPError(f"{name}: expected one of {', '.join(table)}, got {getattr(self, name)!r}")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "merge_keep", merge_keep)
        object.__setattr__(self, "tau", tau)
        for name in ("merge_threshold", "prune_threshold"):
            object.__setattr__(self, name, _number(getattr(self, name), name, optional=True))
        for name in WIDTH_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LTMPError(f"{name}: expected a whole number >= 1 (or null: all of them), got {value!r}")

    @property
    def cuts_width(self) -> bool:
        """Whether this layer keeps fewer heads or MLP hidden units than the model has."""
        return self.heads is not None or self.mlp_hidden is not None

    @property
    def stages(self) -> tuple[str, ...]:
        """The reducer stages this layer runs, in order."""
        return OPS[self.op]

    @property
    def stage_keeps(self) -> tuple[float, ...]:
        """For each stage, the fraction of the layer's input patch tokens left after it."""
        if len(self.stages) == 2:
            mk = self.merge_keep if self.merge_keep is not None else max(MIN_MERGE_KEEP, math.sqrt(self.keep))
            return (mk, self.keep)
        return (self.keep,) * len(self.stages)

    def needs(self) -> tuple[str, ...]:
        """Names of the thresholds this layer's stages use (``merge_threshold``, ``prune_threshold``)."""
        out = []
        for stage in self.stages:
            name = "merge_threshold" if stage == "merge" else "prune_threshold"
            if name not in out:
                out.append(name)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def kept_count(keep: float, n: float | Tensor) -> float | Tensor:
    """Tokens a budget ``keep`` leaves of ``n``: rounded to nearest (halves up), at least one.

    The one rounding rule of the project: static mode keeps these counts, calibration aims at them
    and the per-layer budget term measures against them. ``n`` may be a tensor of counts per image.
    """
    if isinstance(n, (int, float)):
        return max(1, math.floor(keep * n + 0.5))
    return (keep * n + 0.5).floor().clamp_min(1)  # a tensor


def lowest_keep(op: str, num_patches: int) -> float:
    """The smallest ``keep`` an operation can have: 1 for ``none``, 0.5 for a merge (it removes at most
    half), one token of ``num_patches`` for any op that prunes or squeezes."""
    if op == "none":
        return 1.0
    if op == "merge":
        return MIN_MERGE_KEEP
    return 1.0 / num_patches


def stage_counts(n: int, layer: LayerPlan) -> list[int]:
    """Patch tokens left after each stage of ``layer`` when ``n`` enter it (hard-static mode).

    Each stage keeps :func:`kept_count` of the layer's input, and a merge removes at most ``n // 2``
    tokens.
    """
    out: list[int] = []
    cur = n
    for stage, keep in zip(layer.stages, layer.stage_keeps):
        want = kept_count(keep, n)
        if stage == "merge":
            want = max(want, cur - cur // 2)
        cur = min(want, cur)
        out.append(cur)
    return out


def static_stages(n: int, layer: LayerPlan) -> list[tuple[str, int]]:
    """The stages hard-static mode runs in ``layer`` when ``n`` patch tokens enter it, each with the
    tokens it removes (:func:`stage_counts`): a stage left with nothing to remove is not run."""
    out: list[tuple[str, int]] = []
    cur = n
    for stage, left in zip(layer.stages, stage_counts(n, layer)):
        if left < cur:
            out.append((stage, cur - left))
        cur = left
    return out


@dataclass(frozen=True)
class ReductionPlan:
    """A per-layer reduction plan for one ViT geometry.

    Attributes:
        layers: One :class:`LayerPlan` per transformer block.
        model: timm model name the plan was made for (informative).
        geometry: Token geometry of that model; required to compute FLOPs without the model.
        meta: Free-form JSON-serialisable facts (target, measured ratio, study, trial, ...).
    """

    layers: tuple[LayerPlan, ...]
    model: str | None = None
    geometry: ViTGeometry | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            raise LTMPError("layers: a plan needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerPlan):
                raise LTMPError(f"layers[{i}]: expected a LayerPlan, got {type(layer).__name__}")
        g = self.geometry
        if g is not None and len(layers) != g.depth:
            raise LTMPError(f"layers: {len(layers)} layers for a model of depth {g.depth}")
        if g is not None:
            checked = []
            for i, layer in enumerate(layers):
                for name, full in (("heads", g.num_heads), ("mlp_hidden", g.mlp_hidden)):
                    value = getattr(layer, name)
                    if value is not None and value > full:
                        raise LTMPError(f"layers[{i}].{name}: {value} is more than the model's {full}")
                # Full width is written as null: a plan that cuts no width reads as one.
                checked.append(replace(layer, heads=None if layer.heads == g.num_heads else layer.heads,
                                       mlp_hidden=None if layer.mlp_hidden == g.mlp_hidden else layer.mlp_hidden))
            layers = tuple(checked)
        object.__setattr__(self, "layers", layers)
        if self.model is not None and not isinstance(self.model, str):
            raise LTMPError(f"model: expected a string, got {self.model!r}")
        if not isinstance(self.meta, Mapping):
            raise LTMPError(f"meta: expected an object, got {type(self.meta).__name__}")
        try:
            json.dumps(dict(self.meta), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise LTMPError(f"meta: not JSON-serialisable ({e})") from None

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(layer.op for layer in self.layers)

    @property
    def keeps(self) -> tuple[float, ...]:
        return tuple(layer.keep for layer in self.layers)

    @property
    def cuts_width(self) -> bool:
        """Whether any block keeps fewer heads or MLP hidden units than the model has."""
        return any(layer.cuts_width for layer in self.layers)

    def widths(self, geometry: ViTGeometry | None = None) -> list[tuple[int, int]]:
        """``(heads, mlp_hidden)`` every block keeps, in counts (``geometry`` defaults to the plan's)."""
        g = geometry if geometry is not None else self.geometry
        if g is None:
            raise LTMPError("geometry: the plan has no geometry; pass the model's ViTGeometry")
        return [(layer.heads or g.num_heads, layer.mlp_hidden or g.mlp_hidden) for layer in self.layers]

    def with_layers(self, **changes: Sequence[Any]) -> "ReductionPlan":
        """A copy with per-layer fields replaced, e.g. ``plan.with_layers(merge_threshold=[...])``."""
        layers = list(self.layers)
        for name, values in changes.items():
            values = list(values)
            if len(values) != len(layers):
                raise LTMPError(f"{name}: {len(values)} values for {len(layers)} layers")
            layers = [_replace_layer(layer, i, **{name: v}) for i, (layer, v) in enumerate(zip(layers, values))]
        return replace(self, layers=tuple(layers))

    def with_keeps(self, keeps: Sequence[float]) -> "ReductionPlan":
        """A copy with every layer's ``keep`` replaced; a ``merge_keep`` under its layer's new ``keep`` is
        raised to it (the merge stage then removes nothing the layer does not), all else stays."""
        keeps = list(keeps)
        if len(keeps) != self.depth:
            raise LTMPError(f"keep: {len(keeps)} values for {self.depth} layers")
        layers = []
        for i, (layer, keep) in enumerate(zip(self.layers, keeps)):
            keep = _number(keep, f"layers[{i}].keep")
            merge_keep = layer.merge_keep
            if merge_keep is not None and merge_keep < keep:
                merge_keep = min(1.0, keep)
            layers.append(_replace_layer(layer, i, keep=keep, merge_keep=merge_keep))
        return replace(self, layers=tuple(layers))

    def static_counts(self, num_patches: int | None = None) -> list[int]:
        """Patch tokens after each layer in hard-static mode (``num_patches`` defaults to the geometry's)."""
        if num_patches is None:
            if self.geometry is None:
                raise LTMPError("geometry: the plan has no geometry; pass num_patches")
            num_patches = self.geometry.num_patches
        out, n = [], num_patches
        for layer in self.layers:
            counts = stage_counts(n, layer)
            n = counts[-1] if counts else n
            out.append(n)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see :func:`save_plan`)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "geometry": None if self.geometry is None else self.geometry.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ReductionPlan":
        """Validate the JSON form; every error names the offending field."""
        if not isinstance(data, Mapping):
            raise LTMPError(f"plan: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise LTMPError(f"format: expected {FORMAT!r}, got {data.get('format')!r}; not an ltmp-search plan")
        version = data.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise LTMPError(f"version: plan format version {version!r} is not supported "
                            f"(this release reads {', '.join(map(str, READABLE_VERSIONS))})")
        known = {"format", "version", "model", "geometry", "layers", "meta"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LTMPError(f"{unknown[0]}: unknown field")
        if "layers" not in data:
            raise LTMPError("layers: missing")
        raw_layers = data["layers"]
        if not isinstance(raw_layers, list):
            raise LTMPError(f"layers: expected a list, got {type(raw_layers).__name__}")
        layer_fields = {f.name for f in fields(LayerPlan)}
        layers = []
        for i, raw in enumerate(raw_layers):
            if not isinstance(raw, Mapping):
                raise LTMPError(f"layers[{i}]: expected an object, got {type(raw).__name__}")
            bad = sorted(set(raw) - layer_fields)
            if bad:
                raise LTMPError(f"layers[{i}].{bad[0]}: unknown field")
            old = [name for name in WIDTH_FIELDS if name in raw and version < 3]
            if old:
                raise LTMPError(f"layers[{i}].{old[0]}: a version {version} plan cannot cut width (version 3 can)")
            layers.append(_replace_layer(None, i, **raw))
        geometry = data.get("geometry")
        geometry = None if geometry is None else ViTGeometry.from_dict(geometry)
        meta = data.get("meta") or {}
        return cls(layers=tuple(layers), model=data.get("model"), geometry=geometry, meta=meta)


def _replace_layer(layer: LayerPlan | None, index: int, **values: Any) -> LayerPlan:
    """Build or change a layer, prefixing any validation error with ``layers[index].``."""
    try:
        return LayerPlan(**values) if layer is None else replace(layer, **values)
    except LTMPError as e:
        raise LTMPError(f"layers[{index}].{e}") from None
    except TypeError as e:  # a missing or unexpected keyword
        raise LTMPError(f"layers[{index}]: {e}") from None


def measured_plan(plan: ReductionPlan, kept_tokens: Sequence[float], geometry: ViTGeometry | None = None
                  ) -> ReductionPlan:
    """``plan`` with each reducing layer's ``keep`` set to the fraction of its input it kept, measured.

    When thresholds decide (dynamic mode), a layer keeps what its threshold lets through, not its
    budget; this turns what they kept on some images into budgets (what static mode keeps, and what
    the budget terms aim at). A layer's measured keep is the mean patch-token count it passed on over
    the mean count that entered it, bounded to what its op can keep (:func:`lowest_keep`, and 1);
    ``none`` layers keep 1. Thresholds and all other fields stay, but a ``merge_keep`` under the new
    ``keep`` is raised to it (:meth:`ReductionPlan.with_keeps`).

    Args:
        plan: The plan the model ran.
        kept_tokens: Mean tokens, prefix included, that each block passed on (one per layer, as
            :func:`ltmp_core.measure_flops` returns them).
        geometry: The model's geometry (default: the plan's); its patches entered the first block.

    Raises:
        LTMPError: no geometry, or ``kept_tokens`` is not one finite number per layer.
    """
    g = geometry if geometry is not None else plan.geometry
    if g is None:
        raise LTMPError("geometry: the plan carries no geometry; pass the model's ViTGeometry")
    if len(kept_tokens) != plan.depth:
        raise LTMPError(f"kept_tokens: {len(kept_tokens)} counts for {plan.depth} layers")
    before, keeps = float(g.num_patches), []
    for i, (layer, kept) in enumerate(zip(plan.layers, kept_tokens)):
        after = _number(kept, f"kept_tokens[{i}]") - g.num_prefix_tokens
        low = lowest_keep(layer.op, g.num_patches)
        keeps.append(1.0 if layer.op == "none" else min(1.0, max(low, after / max(before, 1e-9))))
        before = after
    return plan.with_keeps(keeps)


PerLayer = Union[Any, Sequence[Any]]


def _per_layer(value: PerLayer, depth: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise LTMPError(f"{name}: {len(value)} values for a model of depth {depth}")
        return list(value)
    return [value] * depth


def make_plan(
    model: nn.Module | ViTGeometry,
    op: PerLayer = "merge+prune",
    keep: PerLayer = 0.9,
    *,
    merge_keep: PerLayer = None,
    tau: PerLayer = DEFAULT_TAU,
    importance: PerLayer = "mean",
    merge_order: PerLayer = "keep",
    squeeze_host: PerLayer = "keys",
    importance_scale: PerLayer = "relative",
    heads: PerLayer = None,
    mlp_hidden: PerLayer = None,
    model_name: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ReductionPlan:
    """Build a plan for ``model`` (a timm ViT, or its :class:`ViTGeometry`).

    Each of ``op``, ``keep``, ``merge_keep``, ``tau``, ``importance`` and the variants
    (``merge_order``, ``squeeze_host``, ``importance_scale``) and of the widths (``heads``,
    ``mlp_hidden``: counts kept, ``None`` for all; default: what the model's blocks have now, see
    :class:`LayerPlan`) is one value for every layer or a list with one value per layer. Layers whose op is ``none`` get ``keep=1`` whatever
    ``keep`` says.

    Example:
        >>> plan = make_plan(model, op=["none", "merge", "merge+prune", "prune"], keep=0.8)
    """
    if isinstance(model, ViTGeometry):
        geometry = model
    else:
        from .geometry import block_widths

        geometry = ViTGeometry.from_model(model)
        if model_name is None:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            model_name = cfg.get("architecture")
        # A model whose width was cut: the plan keeps the widths it has, unless told otherwise.
        widths = block_widths(model)
        heads = [h for h, _ in widths] if heads is None else heads
        mlp_hidden = [m for _, m in widths] if mlp_hidden is None else mlp_hidden
    depth = geometry.depth
    ops = _per_layer(op, depth, "op")
    keeps = _per_layer(keep, depth, "keep")
    merge_keeps = _per_layer(merge_keep, depth, "merge_keep")
    taus = _per_layer(tau, depth, "tau")
    importances = _per_layer(importance, depth, "importance")
    variants = [dict(zip(("merge_order", "squeeze_host", "importance_scale"), v)) for v in zip(
        _per_layer(merge_order, depth, "merge_order"), _per_layer(squeeze_host, depth, "squeeze_host"),
        _per_layer(importance_scale, depth, "importance_scale"))]
    for var, h, m in zip(variants, _per_layer(heads, depth, "heads"), _per_layer(mlp_hidden, depth, "mlp_hidden")):
        var.update(heads=h, mlp_hidden=m)
    layers = []
    for i, (o, k, mk, t, imp, var) in enumerate(zip(ops, keeps, merge_keeps, taus, importances, variants)):
        if o == "none":
            k, mk = 1.0, None
        elif o not in ("merge+prune", "merge+squeeze"):
            mk = None
        layers.append(_replace_layer(None, i, op=o, keep=k, merge_keep=mk, tau=t, importance=imp, **var))
    return ReductionPlan(layers=tuple(layers), model=model_name, geometry=geometry, meta=dict(meta or {}))


def save_plan(plan: ReductionPlan, path: str | os.PathLike[str]) -> Path:
    """Write ``plan`` as JSON, atomically: the file is either the whole plan or untouched."""
    text = json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


def load_plan(path: str | os.PathLike[str]) -> ReductionPlan:
    """Read and validate a plan written by :func:`save_plan` (or ``search export``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LTMPError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LTMPError(f"{path}: cannot read plan ({e})") from None
    try:
        data = json.loads(text, parse_constant=lambda c: float(c))
    except json.JSONDecodeError as e:
        raise LTMPError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        return ReductionPlan.from_dict(data)
    except LTMPError as e:
        raise LTMPError(f"{path}: {e}") from None
