"""Patch a timm ViT in place so that its blocks merge, prune and squeeze tokens.

:func:`apply_plan` swaps the classes of the model and of its blocks (as ToMe does), so weights,
devices, hooks and dtypes stay where they are. The patched block is timm's two residual lines with a
reduction in between; it calls timm's own submodules (``norm1``, ``ls1``/``ls2``, ``mlp``, and through
:func:`ltmp_core.attention.attend` the attention's ``qkv``, ``q_norm``/``k_norm``, ``norm``, ``proj``).

Modes:
    soft: training. No token is removed; removed tokens are masked in every later attention (as if
        gone) and the masks carry straight-through gradients to the thresholds.
    dynamic: evaluation. Thresholds decide per image; tokens are really removed and a batch is padded
        to its longest sequence, padded keys masked. Each image gets its batch-of-one result.
    static: deployment. Each layer keeps the plan's token counts (top-k); fixed shapes, no padding.

The blocks of a model share one :class:`_State` (``model._ltmp``, the model's
:class:`~ltmp_core.geometry.ModelState`): the plan, the mode, the geometry a width-cut model was cut
from, and what the current forward pass has recorded (:class:`_Pass`: token sizes, masks, counts).
The accessors below (:func:`token_counts`, :func:`own_counts`, :func:`get_plan`, :func:`thresholds`,
...) are how anything outside reads it; :func:`remove_plan` drops it.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch import Tensor
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaBlock
from timm.models.vision_transformer_relpos import RelPosBlock
from timm.models.vision_transformer import Block

from .attention import Packing, attend, packed
from .errors import LTMPError
from .geometry import STATE, ModelState, ViTGeometry, block_widths, check_model, is_cut_from, model_state
from .masking import score_spread, threshold_between, threshold_mask
from .plan import LayerPlan, ReductionPlan, kept_count, stage_counts, static_stages
from .reducers import KEPT, PRUNED, REDUCERS, SQUEEZED, Compact, Reducer, Tokens, head_mean, top_k_mask, unit_norm
from .released import RELEASED

__all__ = [
    "MODES",
    "THRESHOLDS",
    "apply_plan",
    "remove_plan",
    "set_mode",
    "get_mode",
    "get_plan",
    "is_patched",
    "calibrate",
    "measure_scales",
    "set_thresholds",
    "first_batch",
    "thresholds",
    "clamp_thresholds",
    "threshold_parameters",
    "threshold_names",
    "threshold_scales",
    "token_counts",
    "own_counts",
    "trace_tokens",
    "TokenTrace",
    "FORMS",
    "reduction_form",
    "SOFT_FORMS",
    "get_soft_form",
]

MODES = ("soft", "dynamic", "static")

#: How a forward pass ran its reducers (:func:`reduction_form`), which decides what their similarity
#: products cost: ``masked`` (soft and dynamic mode: the masked reducers, every stage over the block's
#: whole sequence), ``top-k`` (static mode through the masked reducers, as for a stage without a fast
#: form or :func:`trace_tokens`: the same, but a stage with nothing to remove is skipped), ``compact``
#: (static mode's fast forms, :class:`ltmp_core.reducers.Compact`).
FORMS = ("masked", "top-k", "compact")

#: What soft mode computes: ``project`` (this project's soft forward, the default: the masks compose,
#: the split alternates over live tokens, and the deployed model's rules hold) or ``ltmp`` (LTMP's
#: released training forward, :mod:`ltmp_core.released`: merge and prune only, ToMe's token order,
#: mean attention over all queries in raw units).
SOFT_FORMS = ("project", "ltmp")

#: The learned scalars a block may hold: which one a stage uses is ``Reducer.threshold``.
THRESHOLDS = ("merge_threshold", "prune_threshold")


@dataclass
class _Pass:
    """What the blocks record during one forward pass; block 0 starts a new one."""

    batch: int
    n_patch: int  # static mode: live patch tokens, the same for every image
    # [B]: tokens (prefix included) entering block 0, then after each block; an int when every image has the same
    counts: list[Tensor | int]
    device: torch.device | None = None
    own: list[Tensor] = field(default_factory=list)  # soft mode, [B]: patch tokens each block's own cut kept
    size: Tensor | None = None  # [B, N]: patches each token stands for; None while all are 1
    alive: Tensor | None = None  # [B, N]: 0/1 (soft: straight-through masks); None while every position is live
    order: Tensor | None = None  # soft mode, [B, N]: sequence order keys after a tome-order merge; None: positions
    packing: Packing | None = None  # hard modes, padded batch: flat indices of the live rows
    lengths: list[int] | None = None  # hard modes, padded batch: live tokens of each image (live ones first)
    form: str = "masked"  # FORMS: how the reducers of this pass ran
    # hard modes, models with positions (RoPE, relative bias), [B, N]: where in block 0's sequence each
    # token stood (a merged token: its destination); None while every token is where it started
    pos: Tensor | None = None


@dataclass
class _Trace:
    """Where every patch of a batch is, block by block (:func:`trace_tokens`)."""

    owner: Tensor  # [B, P]: position of the token that holds each patch, -1 when dropped
    fate: Tensor  # [B, P]: KEPT, PRUNED or SQUEEZED
    steps: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class _State(ModelState):
    """The plan and mode of a patched model, and the record of its last forward pass."""

    def __init__(self, plan: ReductionPlan, mode: str, num_prefix: int, cut_from: ViTGeometry | None = None) -> None:
        super().__init__(cut_from)
        self.plan = plan
        self.mode = mode
        self.soft_form = "project"  # SOFT_FORMS: what soft mode computes
        self.num_prefix = num_prefix
        # calibrate(): "budgets" sets each threshold from the batch before its layer reduces; "spread"
        # keeps the thresholds and records how spread the scores are around each one.
        self.calibrating: str | None = None
        self.tracing = False  # trace_tokens(): follow every patch through the blocks
        self.scales: dict[tuple[int, str], float] = {}  # spread of each threshold's scores at calibration
        self.last: _Pass | None = None
        self.trace: _Trace | None = None
        self.program: list[list[tuple[Reducer, int]]] | None = None  # static_program() of the last pass
        self._programs: dict[int, list[list[tuple[Reducer, int]]] | None] = {}
        self.checkpointing = False  # model.set_grad_checkpointing(True): blocks recompute in backward
        self.positional = False  # the attention needs every token's position (RoPE, relative bias)

    def __getstate__(self) -> dict[str, Any]:
        """What pickles: the plan, mode and calibration, not the record of the last pass."""
        state = dict(self.__dict__)
        state.update(last=None, trace=None, program=None, _programs={})
        return state

    def static_program(self, x: Tensor) -> list[list[tuple[Reducer, int]]] | None:
        """Begin a static pass through the stages' fast forms: per block, each stage that removes tokens
        and how many (worked out once per input length), or ``None`` when a stage has no fast form. A
        block whose stages all remove nothing runs as an unreduced block: no importance scores, no
        similarities.

        The pass records token counts as plain integers: every image has the same.
        """
        n = x.shape[1]
        if n not in self._programs:
            program: list[list[tuple[Reducer, int]]] | None = []
            current = n - self.num_prefix
            for layer in self.plan.layers:
                if any(REDUCERS[s].static is None for s in layer.stages):
                    program = None
                    break
                # A stage that removes nothing is not run (nor are the scores only it would read).
                steps = [(REDUCERS[stage], r) for stage, r in static_stages(current, layer)]
                current -= sum(r for _, r in steps)
                program.append(steps)
            self._programs[n] = program
        self.program = self._programs[n]
        if self.program is not None:
            self.last = _Pass(batch=x.shape[0], n_patch=n - self.num_prefix, counts=[n], device=x.device,
                              form="compact")
        return self.program

    def begin(self, x: Tensor) -> _Pass:
        b, n = x.shape[0], x.shape[1]
        self.last = _Pass(batch=b, n_patch=n - self.num_prefix,
                          counts=[torch.full((b,), float(n), device=x.device)],
                          form="top-k" if self.mode == "static" else "masked")
        if self.tracing:
            owner = torch.arange(self.num_prefix, n, device=x.device).expand(b, n - self.num_prefix).clone()
            self.trace = _Trace(owner, torch.zeros_like(owner))
        return self.last


class _LTMPBlockMixin:
    """The patched block: timm's two pre-norm residual lines with a token reduction between attention
    and MLP. A concrete class per timm block (:data:`_BLOCK_CLASSES`) says how its branches scale
    (``_branch1``, ``_branch2``) and what position information its attention takes."""

    _ltmp_base: type  # what remove_plan restores, and what check_model accepts this block as
    _ltmp: _State
    _ltmp_index: int

    def _branch1(self, y: Tensor) -> Tensor:
        return self.drop_path1(self.ls1(y))

    def _branch2(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _positions(self, p: _Pass, extra: Tensor | None) -> dict[str, Tensor | None]:
        """Position inputs of :func:`attend` for the tokens as they lie now, from what timm hands the
        block (``extra``: Eva's rotary table, BEiT's or RelPos's shared bias); none for a plain ``Block``."""
        return {}

    def _ltmp_forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        st = self._ltmp
        if st.checkpointing and torch.is_grad_enabled():
            return _replayable(self, x, extra)
        return self._run(x, extra)

    def _run(self, x: Tensor, extra: Tensor | None) -> Tensor:
        st, index = self._ltmp, self._ltmp_index
        if st.mode == "static" and not st.tracing:
            program = st.static_program(x) if index == 0 else st.program
            if program is not None:
                return self._static_forward(x, st, index, program[index], extra)
        p = st.begin(x) if index == 0 else st.last
        layer = st.plan.layers[index]
        kind = layer.importance if any(REDUCERS[s].needs_importance for s in layer.stages) else None
        y, k, scores = attend(self.attn, self.norm1(x), size=p.size, alive=p.alive, soft=st.mode == "soft",
                              packing=p.packing, lengths=p.lengths, importance=kind, num_prefix=st.num_prefix,
                              raw=layer.importance_scale == "raw", released=_released(st),
                              **self._positions(p, extra))
        x = x + self._branch1(y)
        x = _reduce(st, self, index, x, k, scores) if layer.stages else _pass_through(st, x)
        # A padded batch (dynamic mode) runs its MLP on the live tokens only.
        return x + (self._branch2(x) if p.packing is None else packed(self._branch2, x, p.packing))

    def _static_forward(self, x: Tensor, st: _State, index: int, steps: list[tuple[Reducer, int]],
                        extra: Tensor | None) -> Tensor:
        """Static mode through the stages' fast forms: no masks, no compaction, no host syncs."""
        p = st.last
        layer = st.plan.layers[index]
        kind = layer.importance if any(stage.needs_importance for stage, _ in steps) else None
        y, k, scores = attend(self.attn, self.norm1(x), size=p.size, alive=None, soft=False, packing=None,
                              importance=kind, num_prefix=st.num_prefix, raw=layer.importance_scale == "raw",
                              **self._positions(p, extra))
        x = x + self._branch1(y)
        if steps:
            t = Compact(x=x, index=None, size=p.size, keys=k, importance=scores, num_prefix=st.num_prefix,
                        merge_order=layer.merge_order, squeeze_host=layer.squeeze_host,
                        inplace=not (torch.is_grad_enabled() and x.requires_grad), positional=st.positional)
            for i, (stage, r) in enumerate(steps):
                _tell_later_stages(t, [s for s, _ in steps[i + 1:]])
                t = stage.static(t, r)
            x, p.size = t.gathered()
            if st.positional and t.index is not None:
                p.pos = t.live(_positions_now(p, t.x))
        p.counts.append(x.shape[1])
        return x + self._branch2(x)


class LTMPBlock(_LTMPBlockMixin, Block):
    """timm's pre-norm ``Block`` (``VisionTransformer``) with a token reduction between attention and MLP."""

    _ltmp_base = Block

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        return self._ltmp_forward(x)


class _GammaScaled:
    """Branches scaled by ``gamma_1``/``gamma_2`` parameters (Eva's and BEiT's LayerScale)."""

    def _branch1(self, y: Tensor) -> Tensor:
        return self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)

    def _branch2(self, x: Tensor) -> Tensor:
        y = self.mlp(self.norm2(x))
        return self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


class LTMPEvaBlock(_GammaScaled, _LTMPBlockMixin, EvaBlock):
    """Eva's pre-norm ``EvaBlock`` (EVA-02, ``vit_*_rope_*``, DINOv3, PE-core) with a token reduction.

    Rotary embeddings: every surviving token keeps its own row of the table (a merged token its
    destination's, see :func:`_token_rope`); LayerScale is Eva's ``gamma_1``/``gamma_2``.
    """

    _ltmp_base = EvaBlock

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        return self._ltmp_forward(x, rope)

    def _positions(self, p: _Pass, extra: Tensor | None) -> dict[str, Tensor | None]:
        return {"rope": _token_rope(extra, p.pos, self._ltmp.num_prefix)} if extra is not None else {}


class LTMPBeitBlock(_GammaScaled, _LTMPBlockMixin, BeitBlock):
    """BEiT's ``Block`` with a token reduction: the relative position bias (the block's own table plus
    the model's shared one) is read at the rows and columns of the tokens as they lie now."""

    _ltmp_base = BeitBlock

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        return self._ltmp_forward(x, shared_rel_pos_bias)

    def _positions(self, p: _Pass, extra: Tensor | None) -> dict[str, Tensor | None]:
        attn = self.attn
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if extra is not None:
            bias = extra if bias is None else bias + extra
        return {"pos_bias": _token_bias(bias, p.pos)}


class LTMPRelPosBlock(_LTMPBlockMixin, RelPosBlock):
    """``VisionTransformerRelPos``'s ``RelPosBlock`` with a token reduction: its relative position bias
    (``rel_pos.get_bias()``, or the model's shared one) at the rows and columns of the tokens now."""

    _ltmp_base = RelPosBlock

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:
        return self._ltmp_forward(x, shared_rel_pos)

    def _positions(self, p: _Pass, extra: Tensor | None) -> dict[str, Tensor | None]:
        rel_pos = self.attn.rel_pos
        return {"pos_bias": _token_bias(rel_pos.get_bias() if rel_pos is not None else extra, p.pos)}


#: timm block class -> its patched class (module-level classes, so a patched model pickles by name).
_BLOCK_CLASSES: dict[type, type] = {Block: LTMPBlock, EvaBlock: LTMPEvaBlock, BeitBlock: LTMPBeitBlock,
                                    RelPosBlock: LTMPRelPosBlock}


def _token_bias(bias: Tensor | None, pos: Tensor | None) -> Tensor | None:
    """A relative position bias ``[1 or H, ..., N0, N0]`` over the first block's sequence, read at the
    rows and columns of the tokens as they lie now: ``[B, H, N, N]`` (a merged token: its
    destination's row and column, as for rotary positions)."""
    if bias is None or pos is None:
        return bias
    table = bias.reshape(-1, *bias.shape[-2:])  # [H, N0, N0]
    return table[:, pos[:, :, None], pos[:, None, :]].transpose(0, 1)


def _no_mask(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise LTMPError("a patched block takes no attention mask or causal flag; it masks tokens itself")


def _positions_now(p: _Pass, like: Tensor) -> Tensor:
    """``[B, N]``: where in the first block's sequence each token of the current one stood (a merged or
    squeezed token: where its destination stood)."""
    if p.pos is not None:
        return p.pos
    b, n = like.shape[0], like.shape[1]
    return torch.arange(n, device=like.device).expand(b, n)


def _token_rope(rope: Tensor, pos: Tensor | None, num_prefix: int) -> Tensor:
    """The rotary rows of the patch tokens as they lie now: row ``pos - num_prefix`` of every token.

    A surviving token keeps the rotary position it started with; a merged token is its destination
    (its features are the size-weighted mean, but it sits where the destination sat), so it rotates
    as the destination. That keeps every relative angle between two survivors what it was in the
    unreduced model (ToMe's rule for absolute positions, which it averages, would give a merged token
    a position no patch had; work on ToMe for RoPE ViTs, 2024-25, keeps the destination's or one
    representative's position for the same reason).
    """
    if pos is None:
        return rope
    idx = pos[:, num_prefix:] - num_prefix  # [B, P]
    if rope.dim() == 2:  # [P0, D]: one table for every head (axial / 2-D RoPE)
        return rope[idx].unsqueeze(1)
    if rope.dim() == 3:  # [H, P0, D]: a table per head (mixed RoPE, one block's slice)
        return rope[:, idx].transpose(0, 1)
    raise LTMPError(f"rope: a rotary table of shape {tuple(rope.shape)} is not supported (patch dropout?)")


def _replayable(block: _LTMPBlockMixin, x: Tensor, extra: Tensor | None) -> Tensor:
    """The block under activation checkpointing (``model.set_grad_checkpointing(True)``).

    The block reads and writes the pass's record (``model._ltmp.last``: sizes, masks, positions,
    counts), which the first forward has moved on by the time backward recomputes the block. So the
    block keeps a copy of the record as it found it, and the recomputation runs on a fresh copy of
    that copy and leaves the real record alone: it sees what the first forward saw and computes the
    same tensors (non-reentrant checkpointing, which also carries the gradients of the masks and sizes
    the block passes on through the record).
    """
    from torch.utils.checkpoint import checkpoint

    st = block._ltmp
    before = _copy_pass(st.last)
    first = [True]

    def run(x: Tensor, extra: Tensor | None) -> Tensor:
        if first[0]:
            first[0] = False
            return block._run(x, extra)
        current, program = st.last, st.program
        st.last = _copy_pass(before)
        try:
            return block._run(x, extra)
        finally:
            st.last, st.program = current, program

    return checkpoint(run, x, extra, use_reentrant=False)


def _copy_pass(p: _Pass | None) -> _Pass | None:
    """A copy of a pass record whose lists a block may extend without touching the original."""
    if p is None:
        return None
    return dataclasses.replace(p, counts=list(p.counts), own=list(p.own))


# -- the reduction between attention and MLP ---------------------------------------------------------


def _reduce(st: _State, block: nn.Module, index: int, x: Tensor, k: Tensor, importance: Tensor | None) -> Tensor:
    layer = st.plan.layers[index]
    stages = [REDUCERS[s] for s in layer.stages]
    p = st.last
    b, n, _ = x.shape
    metric = unit_norm(head_mean(k))
    ones = torch.ones(b, n, device=x.device, dtype=torch.float32)
    t = Tokens(x=x, size=ones if p.size is None else p.size, alive=ones if p.alive is None else p.alive,
               metric=metric, importance=importance, num_prefix=st.num_prefix, order=p.order,
               merge_order=layer.merge_order, squeeze_host=layer.squeeze_host)
    if _released(st):
        return _reduce_released(st, block, index, t)
    if st.trace is not None:
        t.route = torch.arange(n, device=x.device).expand(b, n).clone()
        t.fate = torch.zeros(b, n, dtype=torch.long, device=x.device)
    fused = any(s.similarities for s in stages)
    if st.mode == "static":
        current = p.n_patch
        for i, (stage, target) in enumerate(zip(stages, stage_counts(current, layer))):
            if target == current:  # removes nothing: not even a tome-order merge reorders (ToMe's r = 0)
                continue
            _tell_later_stages(t, stages[i + 1:])
            t = stage.fn(t, partial(top_k_mask, k=current - target))
            current = target
        p.n_patch = current
        return _compact(st, t, n_keep=st.num_prefix + current, fused=fused)
    n_in = (t.alive.detach()[:, st.num_prefix:] > 0.5).sum(dim=1)
    before = t.alive
    if st.mode == "soft":
        t.alive = before.detach()  # the stages' masks alone: this layer's own cut
    for i, (stage, keep) in enumerate(zip(stages, layer.stage_keeps)):
        _tell_later_stages(t, stages[i + 1:])
        t = stage.fn(t, _decider(st, block, index, layer, stage, t, n_in, keep))
    if st.mode != "soft":
        return _compact(st, t, n_keep=None, fused=fused)
    own = t.alive
    # Compose with the earlier masks; dead tokens were never eligible, their factor is 1.
    p.alive = before * torch.where(before.detach() > 0.5, own, torch.ones_like(own))
    if fused:
        p.size = t.size
    p.order = t.order
    p.counts.append(p.alive.sum(dim=1))
    p.own.append(own[:, st.num_prefix:].sum(dim=1))
    return t.x


def _released(st: _State) -> bool:
    """Whether the pass runs LTMP's released training forward (soft mode, soft form ``ltmp``)."""
    return st.mode == "soft" and st.soft_form == "ltmp"


def _reduce_released(st: _State, block: nn.Module, index: int, t: Tokens) -> Tensor:
    """The reduction of soft form ``ltmp`` (:mod:`ltmp_core.released`): each stage overwrites the masks.

    A block's own count is the sum of the new masks of the patch tokens live when it started: after
    LTMP's overwrite those masks carry this block's thresholds alone.
    """
    p, layer = st.last, st.plan.layers[index]
    before = t.alive.detach() > 0.5
    for name in layer.stages:
        threshold = REDUCERS[name].threshold
        t = RELEASED[name](t, partial(threshold_mask, threshold=_threshold_param(block, index, threshold),
                                      tau=layer.tau))
    p.alive, p.size, p.order = t.alive, t.size, t.order
    p.counts.append(p.alive.sum(dim=1))
    p.own.append((t.alive * before)[:, st.num_prefix:].sum(dim=1))
    return t.x


def _check_soft_form(plan: ReductionPlan, soft_form: str) -> None:
    """Raise :class:`LTMPError` unless ``soft_form`` is known and, for ``ltmp``, the plan is one that
    LTMP's released forward can run (so that soft and hard modes mean the same by each threshold)."""
    if soft_form not in SOFT_FORMS:
        raise LTMPError(f"soft_form: unknown soft form {soft_form!r} (choose from {', '.join(SOFT_FORMS)})")
    if soft_form == "project":
        return
    for i, layer in enumerate(plan.layers):
        others = [s for s in layer.stages if s not in RELEASED]
        if others:
            raise LTMPError(f"layers[{i}].op: soft_form 'ltmp' runs LTMP's released merge and prune only, "
                            f"not {others[0]!r}; use soft_form='project'")
        wanted = {"merge_order": "tome"} if "merge" in layer.stages else {}
        if "prune" in layer.stages:
            wanted.update(importance="mean", importance_scale="raw")
        for name, value in wanted.items():
            if getattr(layer, name) != value:
                raise LTMPError(f"layers[{i}].{name}: soft_form 'ltmp' is LTMP's released forward, which "
                                f"needs {name}={value!r}, got {getattr(layer, name)!r}")


def _pass_through(st: _State, x: Tensor) -> Tensor:
    """A block without reduction: the counts, masks and trace carry over unchanged."""
    p = st.last
    last = p.counts[-1]
    p.counts.append(last)
    if st.mode == "soft":
        p.own.append(last.detach() - st.num_prefix)
    if st.trace is not None:
        st.trace.steps.append((st.trace.owner.cpu(), st.trace.fate.cpu()))
    return x


def _tell_later_stages(t: Tokens | Compact, later: list[Reducer]) -> None:
    """Whether a later stage of the block reads the fused metric and importance (else fusing skips them)."""
    t.needs_metric = any(s.similarities for s in later)
    t.needs_importance = any(s.needs_importance for s in later)


def _decider(st: _State, block: nn.Module, index: int, layer: LayerPlan, stage: Reducer, t: Tokens,
             n_in: Tensor, keep: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``decide`` function of one stage: calibration, soft threshold mask, or hard threshold."""
    name = stage.threshold
    # Prune scores are negated importances: "remove the highest score" = "prune the least important".
    sign = 1.0 if name == "merge_threshold" else -1.0
    if st.calibrating == "spread":
        param = block._parameters[name]

        def measure_and_decide(score: Tensor, eligible: Tensor) -> Tensor:
            theta = sign * float(param)
            st.scales[(index, name)] = score_spread(score, eligible, theta)
            return ((score > theta) & eligible).float()

        return measure_and_decide
    if st.calibrating == "budgets":
        # Aim at the batch-mean kept fraction: every token of image b weighs 1 / n_in[b].
        n = n_in.float().clamp_min(1)
        live = (t.alive.detach()[:, st.num_prefix:] > 0.5).sum(dim=1).float()
        remove = float(((live - kept_count(keep, n)).clamp_min(0) / n).sum())
        weight = (1.0 / n).unsqueeze(1).expand_as(t.alive)

        def calibrate_and_decide(score: Tensor, eligible: Tensor) -> Tensor:
            theta, scale = threshold_between(score, eligible, remove, weight)
            _set_threshold(block, name, sign * theta)
            st.scales[(index, name)] = scale
            return ((score > theta) & eligible).float()

        return calibrate_and_decide
    param = _threshold_param(block, index, name)
    if st.mode == "soft":
        return lambda score, eligible: threshold_mask(score, sign * param, layer.tau)
    return lambda score, eligible: (score > sign * param).float()


def _threshold_param(block: nn.Module, index: int, name: str) -> nn.Parameter:
    """Block ``index``'s learned threshold ``name``; an error saying how to set it when it is not set."""
    param = block._parameters.get(name)
    if param is None:
        raise LTMPError(f"layers[{index}].{name}: not set; calibrate the thresholds with "
                        "ltmp_core.calibrate(model, images) or apply the plan in mode='static'")
    return param


def _set_threshold(block: nn.Module, name: str, value: float) -> None:
    """Give ``block`` its threshold ``name``: a new scalar parameter, or a new value of the existing one."""
    param = block._parameters.get(name)
    if param is None:
        device = next(block.parameters()).device
        block.register_parameter(name, nn.Parameter(torch.tensor(float(value), device=device)))
    else:
        with torch.no_grad():
            param.fill_(value)


def _compact(st: _State, t: Tokens, n_keep: int | None, fused: bool) -> Tensor:
    """Drop dead tokens: live ones move to the front in sequence order; pad to the longest row (dynamic)."""
    alive = t.alive > 0.5
    b, n = alive.shape
    counts = alive.sum(dim=1)
    padded = False
    lengths = None
    if n_keep is None:
        lengths = counts.tolist()  # one host sync, as the longest row's length needs anyway
        n_keep, padded = max(lengths), min(lengths) != max(lengths)
    pos = torch.arange(n, device=alive.device)
    if t.order is None:
        key = torch.where(alive, pos, pos + n)
    else:  # a tome-order merge reordered the sequence; the compacted positions are its order from here on
        key = torch.where(alive, t.order, t.order.amax(dim=1, keepdim=True) + 1 + pos)
    idx = key.topk(n_keep, dim=1, largest=False, sorted=True).indices
    x = t.x.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.x.shape[-1]))
    p = st.last
    if fused or p.size is not None:
        p.size = t.size.gather(1, idx)
    p.alive = alive.gather(1, idx).float() if padded else None
    if st.positional:
        p.pos = _positions_now(p, t.x).gather(1, idx)
    if padded:
        flat = p.alive.flatten() > 0.5
        p.packing = flat.nonzero().squeeze(1)
        p.lengths = lengths
    else:
        p.packing = p.lengths = None
    if st.trace is not None:
        _follow(st.trace, t, idx)
    p.counts.append(counts.float())
    return x


def _follow(trace: _Trace, t: Tokens, idx: Tensor) -> None:
    """Move every patch to the position of the token that holds it after this block."""
    b, n = t.alive.shape
    new_pos = torch.full((b, n), -1, dtype=torch.long, device=idx.device)
    new_pos.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
    held = trace.owner
    live = held >= 0
    routed = torch.where(live, t.route.gather(1, held.clamp_min(0)), held)
    via = torch.where(live, t.fate.gather(1, held.clamp_min(0)), torch.zeros_like(held))
    owner = torch.where(routed >= 0, new_pos.gather(1, routed.clamp_min(0)), torch.full_like(routed, -1))
    fate = torch.where(live & (owner < 0), torch.full_like(trace.fate, PRUNED), trace.fate)
    fate = torch.where((via == SQUEEZED) & (fate == KEPT) & (owner >= 0), torch.full_like(fate, SQUEEZED), fate)
    trace.owner, trace.fate = owner, fate
    trace.steps.append((owner.cpu(), fate.cpu()))


# -- the patched model -------------------------------------------------------------------------------


class _PatchedModel:
    """Mixin for the model class: size-weighted, padding-aware average and max pooling."""

    _ltmp: _State
    _ltmp_base: type

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        p = self._ltmp.last
        reduced = p is not None and (p.size is not None or p.alive is not None)
        if reduced and getattr(self, "attn_pool", None) is not None:
            return self._attention_pool(x, p)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("token", "") or p is None or (p.size is None and p.alive is None):
            return super().pool(x, pool_type)  # type: ignore[misc]
        return self._weighted_pool(x, p, pool_type)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's head; a model that averages in ``forward_head`` without a ``pool`` method (BEiT,
        ``VisionTransformerRelPos``) averages the reduced tokens size-weighted, padding left out."""
        p = self._ltmp.last
        if (hasattr(super(), "pool") or self.global_pool != "avg" or p is None
                or (p.size is None and p.alive is None)):
            return super().forward_head(x, pre_logits)  # type: ignore[misc]
        x = self.head_drop(self.fc_norm(self._weighted_pool(x, p, "avg")))
        return x if pre_logits else self.head(x)

    def _weighted_pool(self, x: Tensor, p: _Pass, pool_type: str) -> Tensor:
        b, n, _ = x.shape
        weight = torch.ones(b, n, device=x.device, dtype=torch.float32)
        if p.size is not None:
            weight = weight * p.size
        if p.alive is not None:
            weight = weight * p.alive
        if not getattr(self, "pool_include_prefix", False):
            x, weight = x[:, self.num_prefix_tokens:], weight[:, self.num_prefix_tokens:]
        w = weight.to(x.dtype).unsqueeze(-1)
        avg = (x * w).sum(dim=1) / w.sum(dim=1)
        if pool_type == "avg":
            return avg
        mx = x.masked_fill(w <= 0, float("-inf")).amax(dim=1)
        if pool_type == "max":
            return mx
        return 0.5 * (mx + avg)  # avgmax


    def _attention_pool(self, x: Tensor, p: _Pass) -> Tensor:
        """timm's attention-pool head (SigLIP's ``global_pool='map'``) over reduced tokens.

        As proportional attention in the blocks: a token that stands for ``s`` patches adds ``log s`` to
        the latent queries' logits (the pool weighs it as the ``s`` tokens it replaced), and removed or
        padding tokens are masked out (``-inf``; in soft mode the mask carries no gradient, the
        thresholds learn through the blocks' attention).
        """
        bias = torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)
        if p.size is not None:
            bias = bias + p.size.log()
        if p.alive is not None:
            bias = bias.masked_fill(p.alive.detach() <= 0.5, float("-inf"))
        if hasattr(self, "pool_include_prefix") and not self.pool_include_prefix:
            x, bias = x[:, self.num_prefix_tokens:], bias[:, self.num_prefix_tokens:]
        return self.attn_pool(x, attn_mask=bias.to(x.dtype)[:, None, None, :])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the blocks: each patched block checkpoints itself so that its
        recomputation replays the pass's record as the block found it (timm's own checkpointing of the
        block sequence stays off: it would recompute blocks against a record already moved on)."""
        self._ltmp.checkpointing = bool(enable)
        super().set_grad_checkpointing(False)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle (``pickle.dumps``, ``torch.save``, ``copy.deepcopy``) as the stock class plus this
        module's rebuild: the patched class is made at run time and has no importable name."""
        reduced = super().__reduce_ex__(protocol)  # (copyreg.__newobj__, (cls, *args), state, ...)
        return (_new_patched, (self._ltmp_base, *reduced[1][1:]), *reduced[2:])

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates``; ``NCHW`` output puts reduced tokens back on the patch grid.

        In hard modes a block passes on fewer tokens than the grid has positions. For the ``NCHW``
        feature maps every patch position gets the token that holds it after that block: its own token,
        or the token it was merged or squeezed into (so a merged region shows one feature throughout);
        a position whose patch was pruned gets zeros (its content left the model). ``NLC`` output keeps
        the reduced tokens as the blocks passed them on (each image's live tokens first; in a padded
        dynamic batch, padding after them). In soft mode nothing is removed and timm's reshape applies
        as is (a removed token's position holds that token as it was when removed).
        """
        from timm.models._features import feature_take_indices

        st = self._ltmp
        args_ = inspect.signature(super().forward_intermediates).bind(x, *args, **kwargs)  # type: ignore[misc]
        args_.apply_defaults()
        call = args_.arguments
        if call.get("output_fmt", "NCHW") != "NCHW" or st.mode == "soft":
            return super().forward_intermediates(*args_.args, **args_.kwargs)  # type: ignore[misc]
        call["output_fmt"] = "NLC"
        take, _ = feature_take_indices(len(self.blocks), call.get("indices"))
        height, width = x.shape[-2:]
        grid = tuple(int(g) for g in self.patch_embed.dynamic_feat_size((height, width)))
        st.tracing = True
        try:
            out = super().forward_intermediates(*args_.args, **args_.kwargs)  # type: ignore[misc]
            owners = [owner for owner, _ in st.trace.steps]
        finally:
            st.tracing, st.trace = False, None

        def dense(y: Tensor, block: int) -> Tensor:
            owner = owners[block].to(y.device) - st.num_prefix  # [B, P]: the token holding each patch
            rows = y.gather(1, owner.clamp_min(0).unsqueeze(-1).expand(-1, -1, y.shape[-1]))
            rows = rows.masked_fill((owner < 0).unsqueeze(-1), 0.0)
            return rows.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

        def redo(items: list[Any]) -> list[Any]:
            return [(dense(i[0], b), *i[1:]) if isinstance(i, tuple) else dense(i, b) for i, b in zip(items, take)]

        if isinstance(out, dict):
            return {**out, "image_intermediates": redo(out["image_intermediates"])}
        if call.get("intermediates_only"):
            return redo(out)
        return out[0], redo(out[1])


def _new_patched(base: type, *args: Any) -> nn.Module:
    """An empty instance of the patched class of ``base`` (unpickling; the state follows)."""
    cls = _patched_class(base)
    return cls.__new__(cls, *args)


_MODEL_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:
        _MODEL_CLASSES[cls] = type(f"LTMP{cls.__name__}", (_PatchedModel, cls),
                                   {"_ltmp_base": cls, "__module__": __name__})
    return _MODEL_CLASSES[cls]


def _is_positional(model: nn.Module) -> bool:
    """Whether the model's attention reads token positions (rotary embeddings, relative bias)."""
    return getattr(model, "rope", None) is not None or any(type(b) in (BeitBlock, RelPosBlock) for b in model.blocks)


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply_plan` has patched ``model``."""
    return isinstance(model, _PatchedModel)


def _state(model: nn.Module) -> _State:
    if not is_patched(model):
        raise LTMPError("model: not patched; call ltmp_core.apply_plan(model, plan) first")
    return model._ltmp


def thresholds(model: nn.Module) -> list[tuple[int, str, nn.Parameter]]:
    """``(block index, name, parameter)`` of every learned threshold of a patched model.

    In block order, and within a block in the order of :data:`THRESHOLDS` (merge, then prune). A block
    holds a threshold exactly when it has a value (from the plan, or set by :func:`calibrate`); the
    parameters are the model's own (``blocks.i.merge_threshold``), so an optimiser can take them.
    """
    _state(model)
    return [(i, name, block._parameters[name]) for i, block in enumerate(model.blocks) for name in THRESHOLDS
            if block._parameters.get(name) is not None]


@torch.no_grad()
def clamp_thresholds(model: nn.Module) -> None:
    """Clamp every threshold of a patched model in place, as LTMP does after every optimiser step.

    Thresholds go into [0, 1]; a prune threshold in ``relative`` units (``importance_scale``: the
    importance times the live token count, so 1 is an average token and a threshold above 1 means
    something) is clamped only from below, at 0.
    """
    layers = _state(model).plan.layers
    for i, name, param in thresholds(model):
        relative = name == "prune_threshold" and layers[i].importance_scale == "relative"
        param.clamp_(0.0, None if relative else 1.0)


def _cut_from(model: nn.Module, plan: ReductionPlan) -> ViTGeometry | None:
    """The geometry ``model``'s width was cut from: its state's, else the plan's when the model is the
    plan's model cut narrower (cut by :func:`ltmp_core.prune_width`, its state since dropped by
    :func:`remove_plan`); ``None`` for a model at its full width."""
    state = model_state(model)
    if state is not None and state.cut_from is not None:
        return state.cut_from
    if plan.geometry is not None and is_cut_from(model, plan.geometry):
        return plan.geometry
    return None


def _check_fit(model: nn.Module, plan: ReductionPlan, g: ViTGeometry) -> None:
    """Raise :class:`LTMPError` unless the blocks have the widths the plan keeps of ``g`` and the model
    has the class token that ``cls`` importance reads."""
    for i, ((h, m), (want_h, want_m)) in enumerate(zip(block_widths(model), plan.widths(g))):
        if (h, m) != (want_h, want_m):
            hint = ("cut the width first: ltmp_core.prune_width(model, plan, images)" if want_h <= h and want_m <= m
                    else "the model's width was cut for another plan")
            raise LTMPError(f"layers[{i}]: the plan keeps {want_h} heads and {want_m} MLP units, the block has "
                            f"{h} and {m}; {hint}")
    if getattr(model, "cls_token", None) is None:
        for i, layer in enumerate(plan.layers):
            if layer.importance == "cls" and any(REDUCERS[s].needs_importance for s in layer.stages):
                raise LTMPError(f"layers[{i}].importance: 'cls' needs a class token, and this model has none")


def _check_thresholds(plan: ReductionPlan, mode: str, has: Callable[[int, str], bool]) -> None:
    """Raise :class:`LTMPError` unless ``mode`` is static or every threshold the plan uses is set (``has``)."""
    if mode not in MODES:
        raise LTMPError(f"mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "static":
        return
    for i, layer in enumerate(plan.layers):
        for name in layer.needs():
            if not has(i, name):
                raise LTMPError(
                    f"layers[{i}].{name}: not set, and mode {mode!r} needs it; calibrate the thresholds "
                    "with ltmp_core.calibrate(model, images) or use mode='static'"
                )


def apply_plan(model: nn.Module, plan: ReductionPlan, mode: str = "static", *, soft_form: str = "project") -> nn.Module:
    """Patch a timm ViT in place to reduce tokens as ``plan`` says; returns the model.

    ``soft_form`` (:data:`SOFT_FORMS`) says what soft mode computes: this project's soft forward, or
    LTMP's released training forward (``ltmp``; see :func:`set_mode`).

    Thresholds in the plan become parameters of the blocks (``blocks.i.merge_threshold``,
    ``blocks.i.prune_threshold``). A plan that keeps fewer heads or MLP units than the model has
    needs the model cut to those widths first (:func:`ltmp_core.prune_width`); FLOPs ratios of the
    patched model are ratios of the model before the cut (the geometry the model's state recorded, or
    the plan's for a model cut to it whose state :func:`remove_plan` dropped). Thresholds the plan
    lacks must be calibrated (:func:`calibrate`) before soft or dynamic mode can run. A model that is
    already patched is re-patched with the new plan.

    Raises:
        LTMPError: the model is not a supported timm ViT, the plan does not fit it, or ``mode``
            needs thresholds the plan lacks (the model is then left as it was).
    """
    check_model(model)
    if not isinstance(plan, ReductionPlan):
        raise LTMPError(f"plan: expected a ReductionPlan, got {type(plan).__name__}")
    _check_thresholds(plan, mode, lambda i, name: getattr(plan.layers[i], name) is not None)
    _check_soft_form(plan, soft_form)
    if model.global_pool not in ("token", "", "avg") and not hasattr(type(model), "pool"):
        raise LTMPError(f"model: global_pool={model.global_pool!r} of {type(model).__name__} is not supported")
    if plan.depth != len(model.blocks):
        raise LTMPError(f"plan: {plan.depth} layers, but the model has {len(model.blocks)} blocks")
    cut_from = _cut_from(model, plan)
    _check_fit(model, plan, cut_from or ViTGeometry.from_model(model))
    _unpatch(model)
    st = _State(plan, mode, int(model.num_prefix_tokens), cut_from)
    st.soft_form = soft_form
    st.positional = _is_positional(model)
    st.checkpointing = bool(getattr(model, "grad_checkpointing", False))
    model.grad_checkpointing = False  # the blocks checkpoint themselves (_PatchedModel.set_grad_checkpointing)
    model.__class__ = _patched_class(type(model))
    setattr(model, STATE, st)
    for i, (block, layer) in enumerate(zip(model.blocks, plan.layers)):
        block.__class__ = _BLOCK_CLASSES[type(block)]
        block._ltmp = st
        block._ltmp_index = i
        for name in layer.needs():
            if getattr(layer, name) is not None:
                _set_threshold(block, name, getattr(layer, name))
    return model


def _unpatch(model: nn.Module) -> None:
    """Undo :func:`apply_plan`'s classes and thresholds; the model's state keeps only ``cut_from``."""
    if not is_patched(model):
        return
    for block in model.blocks:
        for name in THRESHOLDS:
            block._parameters.pop(name, None)
        for attr in ("_ltmp", "_ltmp_index"):
            block.__dict__.pop(attr, None)
        block.__class__ = type(block)._ltmp_base
    st = model.__dict__.pop(STATE)
    cut_from = st.cut_from
    model.__class__ = type(model)._ltmp_base
    model.grad_checkpointing = st.checkpointing
    if cut_from is not None:
        setattr(model, STATE, ModelState(cut_from))


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan` and drop all that ltmp_core keeps on the model: stock timm again.

    Thresholds, the patched classes and the model's state (``model._ltmp``) go. Width cut by
    :func:`ltmp_core.prune_width` stays cut (those weights are gone): the model is a stock timm model
    of its narrower widths, and :meth:`ViTGeometry.from_model` reads them, no longer the geometry it
    was cut from (a model whose blocks differ in width it refuses). :func:`apply_plan` with the plan
    the model was cut for measures FLOPs against that plan's geometry again.
    """
    _unpatch(model)
    model.__dict__.pop(STATE, None)
    return model


def set_mode(model: nn.Module, mode: str, *, soft_form: str | None = None) -> nn.Module:
    """Switch a patched model between ``soft``, ``dynamic`` and ``static``; returns the model.

    ``soft_form`` (:data:`SOFT_FORMS`; ``None`` keeps the model's) says what soft mode computes:
    ``project``, this project's soft forward (the default), or ``ltmp``, LTMP's released training
    forward (:mod:`ltmp_core.released`: the split over all positions, detached fusion, masks
    overwritten, the top patch prunable, scores not detached, LTMP's epsilon softmax). ``ltmp`` runs
    merge and prune only, with ToMe's token order (``merge_order='tome'``) and LTMP's importance
    (``importance='mean'``, ``importance_scale='raw'``). The hard modes are the same for both forms.

    Raises:
        LTMPError: an unknown mode or form, thresholds ``mode`` needs are not set, or the plan is not
            one that soft form ``ltmp`` can run.
    """
    st = _state(model)
    _check_thresholds(st.plan, mode, lambda i, name: name in model.blocks[i]._parameters)
    if soft_form is not None:
        _check_soft_form(st.plan, soft_form)
        st.soft_form = soft_form
    st.mode = mode
    return model


def get_mode(model: nn.Module) -> str:
    """The current mode of a patched model."""
    return _state(model).mode


def get_soft_form(model: nn.Module) -> str:
    """What soft mode computes in a patched model: one of :data:`SOFT_FORMS`."""
    return _state(model).soft_form


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned thresholds of a patched model (two scalars per block at most), as :func:`thresholds`."""
    return [param for _, _, param in thresholds(model)]


def threshold_names(model: nn.Module) -> list[str]:
    """Which threshold (``merge_threshold`` or ``prune_threshold``) each entry of
    :func:`threshold_parameters` is, aligned with it (for per-kind learning rates)."""
    return [name for _, name, _ in thresholds(model)]


def threshold_scales(model: nn.Module) -> list[float]:
    """How far each threshold must move to change its cut noticeably, from the calibration batch.

    The score gap spanned by the 10% of eligible tokens on either side of the calibrated cut
    (:func:`ltmp_core.masking.threshold_between`); aligned with :func:`threshold_parameters`, 1.0
    for thresholds that were not calibrated. Scores differ in scale between layers and models (an
    untrained model's similarities all sit near 1), so an optimiser should move each threshold in
    these units.
    """
    st = _state(model)
    return [st.scales.get((i, name), 1.0) for i, name, _ in thresholds(model)]


def get_plan(model: nn.Module) -> ReductionPlan:
    """The model's plan with the thresholds it holds now (learned or calibrated)."""
    st = _state(model)
    values: dict[str, list[float | None]] = {name: [None] * st.plan.depth for name in THRESHOLDS}
    for i, name, param in thresholds(model):
        if name in st.plan.layers[i].needs():
            values[name][i] = float(param.detach())
    return st.plan.with_layers(**values)


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor | Iterable[Any]) -> ReductionPlan:
    """Set every threshold so that each layer keeps its planned budget on ``images``.

    Runs the model once in dynamic mode, layer by layer: each threshold is placed between the
    scores of the tokens the budget removes and those it keeps, pooled over the batch (a quantile of
    the scores), before that layer reduces. ``images`` is a batch tensor, or an iterable of batches
    or ``(images, targets)`` pairs of which the first batch is used. Returns :func:`get_plan`.

    To put the whole model on a FLOPs ratio with one shared threshold instead of per-layer budgets,
    see :func:`ltmp_core.calibrate_to_flops`.
    """
    _calibration_pass(model, images, "budgets")
    return get_plan(model)


@torch.no_grad()
def measure_scales(model: nn.Module, images: Tensor | Iterable[Any]) -> list[float]:
    """Record, for every threshold as it is, how spread its scores are around it on ``images``.

    The gap spanned by the 10% of eligible tokens on either side of the cut, as :func:`calibrate`
    records it (:func:`threshold_scales` returns them); for thresholds that were set another way.
    """
    _calibration_pass(model, images, "spread")
    return threshold_scales(model)


def first_batch(images: Tensor | Iterable[Any]) -> Tensor:
    """A batch tensor, or the first batch (or the images of the first ``(images, targets)`` pair) of an iterable."""
    if isinstance(images, Tensor):
        return images
    first = next(iter(images))
    return first[0] if isinstance(first, (list, tuple)) else first


def _calibration_pass(model: nn.Module, images: Tensor | Iterable[Any], kind: str) -> None:
    st = _state(model)
    param = next(iter(model.parameters()))
    previous, was_training = st.mode, model.training
    st.mode, st.calibrating = "dynamic", kind
    model.eval()
    try:
        model(first_batch(images).to(param.device))
    finally:
        st.mode, st.calibrating = previous, None
        model.train(was_training)


def set_thresholds(model: nn.Module, name: str, values: list[float | None]) -> None:
    """Give block ``i`` the threshold ``name`` = ``values[i]`` (``None``: leave it as it is)."""
    st = _state(model)
    if name not in THRESHOLDS:
        raise LTMPError(f"name: expected one of {', '.join(THRESHOLDS)}, got {name!r}")
    if len(values) != st.plan.depth:
        raise LTMPError(f"values: {len(values)} values for {st.plan.depth} blocks")
    for i, (block, layer, value) in enumerate(zip(model.blocks, st.plan.layers, values)):
        if value is None:
            continue
        if name not in layer.needs():
            raise LTMPError(f"layers[{i}].{name}: the layer's op {layer.op!r} has no such threshold")
        _set_threshold(block, name, float(value))


def _last_pass(model: nn.Module) -> _Pass:
    p = _state(model).last
    if p is None:
        raise LTMPError("model: no forward pass has run since the plan was applied")
    return p


def token_counts(model: nn.Module) -> Tensor:
    """Tokens per image, prefix included, in the last forward pass: ``[depth + 1, B]``.

    Row 0 is the input of the first block; row ``l + 1`` is what block ``l`` passes to its MLP and
    to the next block. In soft mode the counts are sums of the (straight-through) masks and carry
    gradients to the thresholds.
    """
    return _counts(_last_pass(model))


def reduction_form(model: nn.Module) -> str:
    """How the last forward pass ran its reducers: one of :data:`FORMS` (what the FLOP model counts)."""
    return _last_pass(model).form


def _counts(p: _Pass) -> Tensor:
    """``p.counts`` as one ``[depth + 1, B]`` tensor."""
    return torch.stack([c if isinstance(c, Tensor) else torch.full((p.batch,), float(c), device=p.device)
                        for c in p.counts])


def own_counts(model: nn.Module) -> Tensor:
    """Patch tokens each block left after its own cut in the last forward pass: ``[depth, B]``.

    In hard modes this is the patch tokens after each block. In soft mode it is the sum of the
    block's own masks over the tokens alive when it started, so it carries the gradient of that
    block's thresholds only: that a block sees fewer tokens because earlier blocks cut more is not
    its doing.
    """
    st = _state(model)
    p = _last_pass(model)
    if st.mode == "soft":
        return torch.stack(p.own)
    return _counts(p)[1:] - st.num_prefix


@dataclass(frozen=True)
class TokenTrace:
    """Where every patch of a batch went, block by block (:func:`trace_tokens`).

    Attributes:
        owner: ``[depth, B, P]`` for the ``P`` patches of each image: after block ``l``, the position
            of the token that holds the patch (patches with the same owner were merged into one
            token), or -1 when the patch was dropped.
        fate: ``[depth, B, P]``: 0 (held, alone or merged), ``PRUNED`` (dropped), ``SQUEEZED``
            (fused into a kept token by a squeeze).
        grid: Patch rows and columns of the image.
    """

    owner: Tensor
    fate: Tensor
    grid: tuple[int, int]


@torch.no_grad()
def trace_tokens(model: nn.Module, images: Tensor) -> TokenTrace:
    """Run ``images`` through a patched model (dynamic or static mode) and follow every patch."""
    st = _state(model)
    if st.mode == "soft":
        raise LTMPError("mode: trace_tokens follows removed tokens; use dynamic or static mode")
    param = next(iter(model.parameters()))
    st.tracing = True
    try:
        model(images.to(param.device))
        steps = st.trace.steps
    finally:
        st.tracing, st.trace = False, None
    ph, pw = model.patch_embed.patch_size
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    return TokenTrace(torch.stack([o for o, _ in steps]), torch.stack([f for _, f in steps]), grid)
