"""A latency model of one device: how long a plan takes, from its token counts, without timing it.

Measured once per device, batch size and mode (:func:`measure_latency_model`): a few probe plans
(every block doing one kind of reduction at two strengths, one plan with unreduced blocks between
reducing ones, and the unreduced model) run with timers on every block's parts, timm's own
submodules marking where each part starts and ends:

- ``attention``: the block's start to ``ls1`` (with the importance scores the block's reduction needs,
  and what a patched block does before it, such as working out a static program in block 0);
- ``reduce``: ``ls1`` to ``norm2`` (the residual and the block's merge, prune or squeeze);
- ``mlp``: ``norm2`` to the block's end.

Each part becomes a curve of seconds against token count (entering tokens for ``attention`` and
``reduce``, per kind of block; leaving tokens for ``mlp``, one curve for all blocks): piecewise
linear over the measured counts and made non-decreasing. The sum of a plan's parts maps to its
end-to-end time by a line fitted on the patched probes' unhooked times, taken as the real checks
take them (``Timer.blocked_autorange``, :data:`E2E_REPEATS` repeats): hooks cost time too, and patch
embedding and head are its constant. Every probe is timed between two timings of the stock model and
enters the fit as its ratio to them (median over the repeats, in units of the stock model's median
time), so the stock model anchors the unreduced prediction through ratios, as robust to a loaded
machine as the real checks, not through one timing of its own, and no one timing of it is shared by
every probe (which would move every predicted ratio by one factor).
A plan's predicted latency ratio is its predicted time over the unreduced model's.

Dynamic mode (``mode="dynamic"``): thresholds decide every image's counts, the linears run on the live
rows of a padded batch and every image attends over its own tokens, while the reductions run over the
padded batch. The probes run in dynamic mode (thresholds placed so each block keeps its budget of the
probe images, pooled over the batch, so the images differ), a block's kind is every stage of its op
(:func:`dynamic_kinds`), and the curves are read at the probe images' mean count for attention and MLP
and at the padded batch's length for the reduction (and for an attention that needs the whole attention
map, which runs over the padded batch: :func:`attends_padded`). A dynamic plan is predicted from the
counts it leaves on a batch of images: a block's attention and MLP at the mean of the curves over the
images' counts, its reduction (and such an attention) at the expected longest image of a batch
(:meth:`LatencyModel.parts`).

The model is keyed by the device's fingerprint (:func:`search.setup.timing.device_fingerprint`),
the batch size and the mode, and is stored as JSON (:meth:`LatencyModel.to_dict`).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

import ltmp_core
from ltmp_core import OPS, REDUCERS, LayerPlan, LTMPError, ReductionPlan, ViTGeometry, static_stages
from ltmp_core.plan import MERGE_ORDERS

from .timing import device_fingerprint, ratios_beside, time_beside

__all__ = ["LATENCY_MODES", "Curve", "LatencyModel", "kind_of", "kinds_for", "model_key", "measure_latency_model",
           "plan_counts", "plan_kinds", "dynamic_kinds", "expected_max", "attends_padded", "counts_on"]

#: Modes a latency model is built for: ``static`` (fixed counts) and ``dynamic`` (thresholds decide every
#: image's counts; predicted from the counts of a batch of images).
LATENCY_MODES = ("static", "dynamic")
#: Keeps of the probe plans: every block of a probe keeps this fraction of what enters it.
PROBE_KEEPS = (0.8, 0.93)
PARTS = ("attention", "reduce", "mlp")
#: Calls of a probe in a row, with hooks and then without, in every round.
CALLS = 3
#: Repeats of the end-to-end timing of every probe (interleaved with the stock model).
E2E_REPEATS = 3


#: How a kind names a merge in ToMe's order (its own fast form when it is the block's last stage).
TOME_ORDER = ", tome order"


def kind_of(layer: LayerPlan, stages: Sequence[str] | None = None) -> str:
    """What a block's time depends on besides its counts: the stages that run (static mode runs only
    those that remove tokens: ``stages``, default all of the op's), for a merge its order, and where a
    stage ranks tokens the importance (``mean`` needs the whole attention map, ``cls`` does not).
    ``none`` for a block that runs no stage."""
    stages = tuple(layer.stages if stages is None else stages)
    if not stages:
        return "none"
    kind = "+".join(stages)
    if any(REDUCERS[s].needs_importance for s in stages):
        kind += f"/{layer.importance}"
    return kind + (TOME_ORDER if "merge" in stages and layer.merge_order == "tome" else "")


def _parse_kind(kind: str) -> tuple[str, str, str]:
    """``(op, importance, merge order)`` of a kind named by :func:`kind_of`."""
    order = "tome" if kind.endswith(TOME_ORDER) else "keep"
    op, _, importance = kind.removesuffix(TOME_ORDER).partition("/")
    return op, importance or "mean", order


def plan_kinds(plan: ReductionPlan, geometry: ViTGeometry) -> list[str]:
    """The kind of every block of ``plan`` in static mode (:func:`kind_of` of the stages that remove tokens)."""
    out, current = [], geometry.num_patches
    for layer in plan.layers:
        running = static_stages(current, layer)
        out.append(kind_of(layer, [stage for stage, _ in running]))
        current -= sum(r for _, r in running)
    return out


def attends_padded(kind: str) -> bool:
    """Whether a block of ``kind`` attends over a padded batch in dynamic mode: its stage ranks tokens by
    the mean attention they receive, which needs the whole attention map (computed over the padded batch),
    where fused attention runs every image over its own tokens."""
    return "/" in kind and _parse_kind(kind)[1] == "mean"


def dynamic_kinds(plan: ReductionPlan) -> list[str]:
    """The kind of every block of ``plan`` in dynamic mode: every stage of its op runs (its threshold decides
    what it removes, which may be nothing)."""
    return [kind_of(layer) for layer in plan.layers]


def counts_on(model: nn.Module, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """Tokens per image, prefix included, entering block 0 and leaving every block (``[depth + 1, images]``)
    when ``model`` runs ``batches``: what :meth:`LatencyModel.ratio_of_counts` predicts a dynamic plan from.
    Without gradients but not in inference mode: a study tunes the same model afterwards."""
    per_batch = []
    with torch.no_grad():
        for images in batches:
            model(images)
            per_batch.append(ltmp_core.token_counts(model).float())
    return torch.cat(per_batch, dim=1).cpu().numpy()


def expected_max(values: Sequence[float] | np.ndarray, batch: int) -> float:
    """The expected largest of ``batch`` draws (with replacement) from ``values``: the length a padded batch
    of ``batch`` images has when each image's length is drawn from ``values``. With sorted values
    ``x_1 <= ... <= x_N``, draw ``k`` is the largest with probability ``(k/N)^B - ((k-1)/N)^B``."""
    x = np.sort(np.asarray(values, dtype=float).ravel())
    n = len(x)
    if n == 0:
        raise ValueError("expected_max: no values")
    cdf = (np.arange(1, n + 1) / n) ** batch
    return float(np.dot(x, np.diff(cdf, prepend=0.0)))


def kinds_for(ops: Iterable[str], importance: Iterable[str], orders: Iterable[str] = MERGE_ORDERS) -> list[str]:
    """Every kind of block a study with these ops, importances and merge orders can run in static mode
    (``none`` always; of a two-stage op also each stage alone, for a block where the other removes nothing)."""
    out = ["none"]
    orders = tuple(orders)
    for op in ops:
        stages = OPS[op]
        runs = [stages[i:j] for i in range(len(stages)) for j in range(i + 1, len(stages) + 1)]
        for run in runs:
            for imp in importance:
                for order in orders:
                    kind = kind_of(LayerPlan(op="+".join(run), keep=0.9, importance=imp, merge_order=order))
                    if kind not in out:
                        out.append(kind)
    return out


def model_key(fingerprint: str, batch: int, mode: str) -> str:
    """The key of a latency model in a study's ``latency_models``."""
    return f"{fingerprint} | batch {batch} | {mode}"


def plan_counts(plan: ReductionPlan, geometry: ViTGeometry) -> list[int]:
    """Tokens (prefix included) entering block 0, then leaving every block, in static mode."""
    return [geometry.num_tokens] + [geometry.num_prefix_tokens + n for n in plan.static_counts(geometry.num_patches)]


@dataclass(frozen=True)
class Curve:
    """Seconds against token count: piecewise linear through ``(counts, seconds)``, flat beyond them."""

    counts: list[float]
    seconds: list[float]

    @classmethod
    def fit(cls, samples: Sequence[tuple[float, float]]) -> "Curve":
        """The non-decreasing curve closest (least squares) to ``samples`` of ``(count, seconds)``: the
        mean at every count, then adjacent violators pooled."""
        by_count: dict[float, list[float]] = {}
        for n, s in samples:
            by_count.setdefault(float(n), []).append(float(s))
        blocks = [[n, statistics.fmean(v), len(v)] for n, v in sorted(by_count.items())]  # [first count, mean, weight]
        pooled: list[list[Any]] = []
        for n, mean, weight in blocks:
            pooled.append([[n], mean, weight])
            while len(pooled) > 1 and pooled[-2][1] > pooled[-1][1]:
                a, b = pooled.pop(-2), pooled.pop(-1)
                w = a[2] + b[2]
                pooled.append([a[0] + b[0], (a[1] * a[2] + b[1] * b[2]) / w, w])
        counts = [n for group in pooled for n in group[0]]
        seconds = [group[1] for group in pooled for _ in group[0]]
        return cls(counts, seconds)

    def __call__(self, n: float) -> float:
        return float(np.interp(n, self.counts, self.seconds))

    def mean(self, ns: Sequence[float] | np.ndarray) -> float:
        """The mean of the curve at every count of ``ns``."""
        return float(np.mean(np.interp(np.asarray(ns, dtype=float), self.counts, self.seconds)))


@dataclass(frozen=True)
class LatencyModel:
    """Predicted time of a plan on one device at one batch size and mode (see the module's text).

    Attributes:
        fingerprint: The device it was measured on.
        batch: Images per forward.
        mode: ``static`` or ``dynamic``: the mode the probes ran in.
        num_tokens: Tokens entering the first block of the model it was measured on.
        depth: Blocks of that model.
        attention: Per kind of block, seconds of its attention against entering tokens.
        reduce: Per kind of block, seconds of its residual and reduction against entering tokens.
        mlp: Seconds of a block's MLP against leaving tokens.
        scale: End-to-end seconds per second of summed parts (fitted on the patched probes).
        constant: End-to-end seconds of a patched model beyond its scaled parts (patch embedding, head, the
            patch's own work, less what the hooks add).
        stock_constant: The same for the stock (unreduced) model, from its median end-to-end time.
        probes: The probes' measured and predicted end-to-end seconds (how well the model fits); measured
            as the median ratio to the stock model within a repeat, times the stock model's median time.
        measured_s: Seconds the measurement took.
    """

    fingerprint: str
    batch: int
    mode: str
    num_tokens: int
    depth: int
    attention: dict[str, Curve]
    reduce: dict[str, Curve]
    mlp: Curve
    scale: float
    constant: float
    stock_constant: float
    probes: list[dict[str, Any]] = field(default_factory=list)
    measured_s: float = 0.0

    @property
    def key(self) -> str:
        return model_key(self.fingerprint, self.batch, self.mode)

    def parts(self, counts: Sequence[float] | np.ndarray, kinds: Sequence[str]) -> float:
        """Summed part seconds of blocks of ``kinds`` with ``counts``: ``depth + 1`` counts (prefix included),
        or per image, ``[depth + 1, images]``. With counts per image (dynamic mode) a block's attention and
        MLP are the mean over the images of their curves at each image's count (its linears run on live
        rows only and every image attends over its own tokens), and its reduction runs over the padded
        batch: the expected longest of :attr:`batch` images (:func:`expected_max`); so does the attention
        of a block that needs the whole attention map (:func:`attends_padded`). With one count per block
        (static mode) all readings are the curves at that count."""
        c = np.asarray(counts, dtype=float)
        if c.ndim == 1:
            c = c[:, None]
        total = 0.0
        for i, kind in enumerate(kinds):
            if kind not in self.attention:
                raise LTMPError(f"latency model: no curve for a {kind} block (measured for "
                                f"{', '.join(self.attention)}); measure it again with --latency-remeasure")
            padded = expected_max(c[i], self.batch)
            attention = self.attention[kind](padded) if attends_padded(kind) else self.attention[kind].mean(c[i])
            total += attention + self.reduce[kind](padded) + self.mlp.mean(c[i + 1])
        return total

    def seconds(self, counts: Sequence[float] | np.ndarray, kinds: Sequence[str]) -> float:
        """Predicted seconds of one forward."""
        return self.scale * self.parts(counts, kinds) + self.constant

    def unreduced_seconds(self) -> float:
        """Predicted seconds of the stock model (not patched)."""
        return self.scale * self.parts([self.num_tokens] * (self.depth + 1), ["none"] * self.depth) + self.stock_constant

    def ratio(self, plan: ReductionPlan, geometry: ViTGeometry) -> float:
        """Predicted time of ``plan`` (static counts from its budgets) over the unreduced model's."""
        if geometry.num_tokens != self.num_tokens or plan.depth != self.depth:
            raise LTMPError(f"latency model: measured on a model of {self.depth} blocks and {self.num_tokens} tokens, "
                            f"not {plan.depth} and {geometry.num_tokens}")
        if plan.cuts_width:
            raise LTMPError("latency model: measured on full-width blocks; it cannot predict a plan that cuts heads "
                            "or MLP units")
        kinds = plan_kinds(plan, geometry) if self.mode == "static" else dynamic_kinds(plan)
        return self.seconds(plan_counts(plan, geometry), kinds) / self.unreduced_seconds()

    def ratio_of_counts(self, counts: Sequence[Sequence[float]] | np.ndarray, kinds: Sequence[str]) -> float:
        """Predicted time over the unreduced model's of blocks of ``kinds`` whose tokens per image, prefix
        included, are ``counts`` (``[depth + 1, images]``, as :func:`ltmp_core.token_counts` gives them): a
        dynamic plan on images like these (:meth:`parts`)."""
        c = np.asarray(counts, dtype=float)
        if c.ndim != 2 or c.shape[0] != self.depth + 1 or len(kinds) != self.depth:
            raise LTMPError(f"latency model: expected counts of {self.depth + 1} rows and {self.depth} kinds, got "
                            f"{list(c.shape)} and {len(kinds)}")
        return self.seconds(c, kinds) / self.unreduced_seconds()

    def to_dict(self) -> dict[str, Any]:
        def curve(c: Curve) -> dict[str, list[float]]:
            return {"counts": c.counts, "seconds": c.seconds}

        return {
            "fingerprint": self.fingerprint, "batch": self.batch, "mode": self.mode, "num_tokens": self.num_tokens,
            "depth": self.depth, "attention": {k: curve(c) for k, c in self.attention.items()},
            "reduce": {k: curve(c) for k, c in self.reduce.items()}, "mlp": curve(self.mlp), "scale": self.scale,
            "constant": self.constant, "stock_constant": self.stock_constant, "probes": self.probes, "measured_s": self.measured_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyModel":
        def curve(c: dict[str, list[float]]) -> Curve:
            return Curve(list(c["counts"]), list(c["seconds"]))

        return cls(d["fingerprint"], int(d["batch"]), d["mode"], int(d["num_tokens"]), int(d["depth"]),
                   {k: curve(c) for k, c in d["attention"].items()}, {k: curve(c) for k, c in d["reduce"].items()},
                   curve(d["mlp"]), float(d["scale"]), float(d["constant"]), float(d["stock_constant"]), list(d.get("probes", [])),
                   float(d.get("measured_s", 0.0)))


def _probe_plans(base: nn.Module, geometry: ViTGeometry, kinds: Sequence[str]) -> dict[str, ReductionPlan]:
    """The unreduced model, every reducing kind in every block at each of :data:`PROBE_KEEPS`, and one
    plan whose unreduced blocks see fewer tokens (reducing and unreduced blocks alternate)."""
    probes: dict[str, ReductionPlan] = {}
    reducing = [k for k in kinds if k != "none"]
    for kind in reducing:
        op, importance, order = _parse_kind(kind)
        for keep in PROBE_KEEPS:
            probes[f"{kind} keep {keep:g}"] = ltmp_core.make_plan(base, op=op, keep=keep, importance=importance,
                                                                  merge_order=order)
    if reducing:
        op, importance, order = _parse_kind(reducing[0])
        ops = [op if i % 2 == 0 else "none" for i in range(geometry.depth)]
        probes["none between reductions"] = ltmp_core.make_plan(base, op=ops, keep=0.75, importance=importance,
                                                                 merge_order=order)
    return probes


class _PartTimer:
    """Hooks on every block (its start and end), its ``ls1`` and its ``norm2`` that note when each part of
    the block starts and ends."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.marks: list[list[float]] = []
        self.handles = []
        for block in _blocks(model):
            marks: list[float] = []
            self.marks.append(marks)
            self.handles += [
                block.register_forward_pre_hook(self._mark(marks, start=True)),
                block.ls1.register_forward_hook(self._mark(marks)),
                block.norm2.register_forward_pre_hook(self._mark(marks)),
                block.register_forward_hook(self._mark(marks)),
            ]

    def _mark(self, marks: list[float], start: bool = False) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.sync()
            if start:
                marks.clear()
            marks.append(time.perf_counter())
        return hook

    def parts(self) -> list[tuple[float, float, float]]:
        """Seconds of every block's attention, reduce and MLP in the last forward."""
        return [(m[1] - m[0], m[2] - m[1], m[3] - m[2]) for m in self.marks]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(hasattr(b, name) for b in blocks for name in ("norm1", "ls1", "norm2")):
        raise LTMPError("latency model: the model's blocks have no norm1, ls1 and norm2 (a timm ViT block) to time")
    return blocks


def measure_latency_model(base: nn.Module, kinds: Sequence[str], *, batch: int = 1, mode: str = "static",
                          device: torch.device | None = None, seconds: float = 6.0, min_rounds: int = 3,
                          max_rounds: int = 30, min_run_time: float = 0.1) -> LatencyModel:
    """Time probe plans of ``base`` (unreduced, on ``device``) at ``batch`` and fit a :class:`LatencyModel`.

    ``kinds``: the kinds of block the plans to predict can have (:func:`kinds_for`). The probes are timed
    with hooks in rounds, :data:`CALLS` calls of every probe per round (interleaved, so load hits them
    alike), until about ``seconds`` have passed (at least ``min_rounds``, at most ``max_rounds``); the
    medians make the curves. Then every probe is timed end to end without hooks, between two timings
    of the stock model (:func:`search.setup.timing.time_beside`, ``min_run_time`` each), to fit how
    summed parts map to end-to-end time. With ``mode`` ``dynamic`` the probes run in dynamic mode, their thresholds
    calibrated on the probe images (see the module's text).
    """
    if mode not in LATENCY_MODES:
        raise LTMPError(f"--latency-mode: {mode!r} is not built; a latency model is measured for "
                        f"{', '.join(LATENCY_MODES)} mode")
    started = time.perf_counter()
    device = device or next(base.parameters()).device
    base = base.eval()
    geometry = ViTGeometry.from_model(base)
    plans = _probe_plans(base, geometry, kinds)
    models: dict[str, nn.Module] = {"unreduced": base}
    counts: dict[str, Any] = {"unreduced": [geometry.num_tokens] * (geometry.depth + 1)}
    layer_kinds: dict[str, list[str]] = {"unreduced": ["none"] * geometry.depth}
    x = torch.randn(batch, 3, *geometry.img_size, device=device)
    for name, plan in plans.items():
        m = ltmp_core.apply_plan(copy.deepcopy(base), plan, mode="static").to(device)
        if mode == "dynamic":
            # Thresholds placed so each block keeps its budget of these images, pooled over the batch (so
            # the images' counts differ and the batch is padded, as dynamic mode runs real images).
            ltmp_core.calibrate(m, x)
            ltmp_core.set_mode(m, "dynamic")
            with torch.inference_mode():
                m(x)
            counts[name] = ltmp_core.token_counts(m).cpu().numpy()
            layer_kinds[name] = dynamic_kinds(plan)
        else:
            counts[name] = plan_counts(plan, geometry)
            layer_kinds[name] = plan_kinds(plan, geometry)
        models[name] = m
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    hooked: dict[str, list[list[tuple[float, float, float]]]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up (static programs are worked out on the first forward)
            m(x)
        rounds = 0
        while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < seconds):
            for name, m in models.items():
                m(x)  # warm again after the other probes (as a timer's repeated calls are)
                timer = _PartTimer(m, device)
                try:
                    for _ in range(CALLS):
                        m(x)
                        sync()
                        hooked[name].append(timer.parts())
                finally:
                    timer.remove()
            rounds += 1

    def call(m: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return m(x)
        return run

    samples: dict[str, dict[str, list[tuple[float, float]]]] = {"attention": {}, "reduce": {}}
    mlp: list[tuple[float, float]] = []
    part_sums: dict[str, float] = {}
    for name in models:
        medians = np.median(np.array(hooked[name]), axis=0)  # [depth, 3]
        part_sums[name] = float(medians.sum())
        c, kinds_here = np.asarray(counts[name], dtype=float), layer_kinds[name]
        c = c[:, None] if c.ndim == 1 else c  # [depth + 1, images]
        for i, (att, red, mlp_s) in enumerate(medians):
            # Read as :meth:`LatencyModel.parts` predicts: attention and MLP at the images' mean count, the
            # reduction (and an attention over the padded batch) at the padded batch's length.
            at = c[i].max() if attends_padded(kinds_here[i]) else c[i].mean()
            samples["attention"].setdefault(kinds_here[i], []).append((at, float(att)))
            samples["reduce"].setdefault(kinds_here[i], []).append((c[i].max(), float(red)))
            mlp.append((c[i + 1].mean(), float(mlp_s)))
    # End to end, without hooks, every probe timed between two timings of the stock model (one Timer block
    # each). Every patched probe has the same blocks, hooks, embedding and head: their end-to-end times are
    # a line in their summed parts (what the hooks add, and what the parts miss). The line is fitted to each
    # probe's time as a ratio to the stock model's timings beside it (median over the repeats), in units of
    # the stock model's median time: a single timing of the stock model moves by tens of percent on a loaded
    # machine, and ratios to one such timing would all move with it (every predicted ratio off by one
    # factor), while ratios to timings beside each probe are what the real checks measure and their errors
    # differ from probe to probe. The stock model's constant closes the line at 1.
    patched = [n for n in models if n != "unreduced"]
    anchors, times = time_beside(call(models["unreduced"]), [call(models[n]) for n in patched],
                                 repeats=E2E_REPEATS, min_run_time=min_run_time)
    base = statistics.median(t for row in anchors for t in row)
    e2e = {"unreduced": base}
    e2e.update({n: base * statistics.median(r) for n, r in zip(patched, ratios_beside(anchors, times))})
    scale, constant = _line([part_sums[n] for n in patched], [e2e[n] for n in patched])
    stock = base - scale * part_sums["unreduced"]
    model = LatencyModel(
        device_fingerprint(device), batch, mode, geometry.num_tokens, geometry.depth,
        {k: Curve.fit(v) for k, v in samples["attention"].items()}, {k: Curve.fit(v) for k, v in samples["reduce"].items()},
        Curve.fit(mlp), scale, constant, stock)
    probes = [{"probe": n, "measured_s": e2e[n], "predicted_s": model.unreduced_seconds() if n == "unreduced" else
               model.seconds(counts[n], layer_kinds[n])} for n in models]
    return replace(model, probes=probes, measured_s=time.perf_counter() - started)


def _line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a x + b`` (``a`` kept within [0.5, 2]); with too little spread in ``x``,
    ``a = 1`` and ``b`` the median offset."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) >= 3 and np.ptp(xs) > 0.05 * abs(xs.mean()):
        a, _ = np.polyfit(xs, ys, 1)
        a = float(min(2.0, max(0.5, a)))
        return a, float(np.median(ys - a * xs))
    return 1.0, float(np.median(ys - xs))
