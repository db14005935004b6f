"""Patch a timm ViT in place so that its blocks merge, prune and squeeze tokens.

:func:`apply_plan` swaps the classes of the model and of its blocks (as ToMe does), so weights,
devices, hooks and dtypes stay where they are. The patched block calls timm's own submodules
(``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``, ``attn.norm``, ``ls1``/``ls2``, ``mlp``, ...)
and only re-implements the attention product, which needs token sizes, masks and the attention map.

Modes:
    soft: training. No token is removed; removed tokens are masked in every later attention (as if
        gone) and the masks carry straight-through gradients to the thresholds.
    dynamic: evaluation. Thresholds decide per image; tokens are really removed and a batch is padded
        to its longest sequence, padded keys masked. Each image gets its batch-of-one result.
    static: deployment. Each layer keeps the plan's token counts (top-k); fixed shapes, no padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from timm.models.vision_transformer import Block

from .errors import LTMPError
from .geometry import check_model
from .masking import masked_softmax, threshold_between, threshold_mask
from .plan import LayerPlan, ReductionPlan, stage_counts
from .reducers import KEPT, PRUNED, REDUCERS, SQUEEZED, Reducer, Tokens, top_k_mask

__all__ = [
    "MODES",
    "apply_plan",
    "remove_plan",
    "set_mode",
    "get_mode",
    "get_plan",
    "is_patched",
    "calibrate",
    "threshold_parameters",
    "threshold_scales",
    "token_counts",
    "trace_tokens",
    "TokenTrace",
]

MODES = ("soft", "dynamic", "static")
_CALIBRATE = "calibrate"  # internal: dynamic, with each threshold set from the batch first


class _State:
    """What the blocks of one patched model share during a forward pass."""

    def __init__(self, plan: ReductionPlan, mode: str, num_prefix: int) -> None:
        self.plan = plan
        self.mode = mode
        self.num_prefix = num_prefix
        self.known: set[tuple[int, str]] = set()  # thresholds that have a value
        self.scales: dict[tuple[int, str], float] = {}  # spread of each threshold's scores at calibration
        self.size: Tensor | None = None  # [B, N] token sizes; None while all are 1
        self.alive: Tensor | None = None  # [B, N] 0/1; None while every position holds a live token
        self.n_patch = 0  # static mode: live patch tokens, the same for every image
        self.batch = 0
        self.counts: list[Tensor | int] = []  # tokens (prefix included) entering each block, then after the last
        self.own: list[Tensor] = []  # soft mode: patch tokens after each block, with gradients of its own cut only
        self._pack: tuple[Tensor, Tensor, Tensor] | None = None  # cached indices of padding()
        self.tracing = False  # follow every patch through the blocks (trace_tokens)
        self.owner: Tensor | None = None  # [B, T0]: position of the token that holds each patch, -1 dropped
        self.fate: Tensor | None = None  # [B, T0]: KEPT, PRUNED or SQUEEZED
        self.trace: list[tuple[Tensor, Tensor]] = []

    def padding(self) -> tuple[Tensor, Tensor] | None:
        """Flat indices (live, padding) of a padded batch's tokens (dynamic mode); ``None`` when not padded."""
        if self.alive is None or self.mode == "soft":
            return None
        if self._pack is None or self._pack[0] is not self.alive:
            flat = (self.alive > 0.5).flatten()
            self._pack = (self.alive, flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))
        return self._pack[1], self._pack[2]

    def start(self, x: Tensor) -> None:
        self.size = None
        self.alive = None
        self.batch, n = x.shape[0], x.shape[1]
        self.n_patch = n - self.num_prefix
        self.counts = [n]
        self.own = []
        if self.tracing:
            p = self.num_prefix
            self.owner = torch.arange(p, n, device=x.device).expand(self.batch, n - p).clone()
            self.fate = torch.zeros_like(self.owner)
            self.trace = []

    # -- reduction -----------------------------------------------------------------------------

    def reduce(self, block: nn.Module, index: int, x: Tensor, k: Tensor, importance: Tensor | None) -> Tensor:
        layer = self.plan.layers[index]
        stages = [REDUCERS[s] for s in layer.stages]
        b, n, _ = x.shape
        p = self.num_prefix
        metric = k.mean(dim=1)
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        ones = torch.ones(b, n, device=x.device, dtype=torch.float32)
        t = Tokens(
            x=x,
            size=self.size if self.size is not None else ones,
            alive=self.alive if self.alive is not None else ones,
            metric=metric,
            importance=importance,
            num_prefix=p,
        )
        if self.tracing:
            t.route = torch.arange(n, device=x.device).expand(b, n).clone()
            t.fate = torch.zeros(b, n, dtype=torch.long, device=x.device)
        if self.mode == "static":
            targets = stage_counts(self.n_patch, layer)
            current = self.n_patch
            for i, (stage, target) in enumerate(zip(stages, targets)):
                self._needs(t, stages[i + 1:])
                t = stage.fn(t, partial(top_k_mask, k=current - target))
                current = target
            self.n_patch = current
            return self._compact(t, n_keep=p + current, fused=any(s.similarities for s in stages))
        n_in = (t.alive.detach()[:, p:] > 0.5).sum(dim=1)
        before = t.alive
        if self.mode == "soft":
            t.alive = before.detach()  # the stages' masks alone: this layer's own cut
        for i, (stage, keep) in enumerate(zip(stages, layer.stage_keeps)):
            self._needs(t, stages[i + 1:])
            t = stage.fn(t, self._decider(block, index, layer, stage, t, n_in, keep))
        if self.mode == "soft":
            own = t.alive
            # Compose with the earlier masks; dead tokens were never eligible, their factor is 1.
            self.alive = before * torch.where(before.detach() > 0.5, own, torch.ones_like(own))
            if any(s.similarities for s in stages):
                self.size = t.size
            self.counts.append(self.alive.sum(dim=1))
            self.own.append(own[:, p:].sum(dim=1))
            return t.x
        return self._compact(t, n_keep=None, fused=any(s.similarities for s in stages))

    @staticmethod
    def _needs(t: Tokens, later: list[Reducer]) -> None:
        t.needs_metric = any(s.similarities for s in later)
        t.needs_importance = any(s.needs_importance for s in later)

    def _decider(self, block: nn.Module, index: int, layer: LayerPlan, stage: Reducer, t: Tokens,
                 n_in: Tensor, keep: float):
        name = stage.threshold
        # Prune scores are negated importances: "remove the highest score" = "prune the least important".
        sign = 1.0 if name == "merge_threshold" else -1.0
        param: nn.Parameter = getattr(block, name)
        if self.mode == _CALIBRATE:
            # Aim at the batch-mean kept fraction: every token of image b weighs 1 / n_in[b].
            n = n_in.float().clamp_min(1)
            live = (t.alive.detach()[:, self.num_prefix:] > 0.5).sum(dim=1).float()
            want = torch.clamp(torch.floor(keep * n + 0.5), min=1)
            remove = float(((live - want).clamp_min(0) / n).sum())
            weight = (1.0 / n).unsqueeze(1).expand_as(t.alive)

            def decide(score: Tensor, eligible: Tensor) -> Tensor:
                theta, scale = threshold_between(score, eligible, remove, weight)
                with torch.no_grad():
                    param.fill_(sign * theta)
                self.known.add((index, name))
                self.scales[(index, name)] = scale
                return ((score > theta) & eligible).float()

            return decide
        if (index, name) not in self.known:
            raise LTMPError(
                f"layers[{index}].{name}: not set; calibrate the thresholds with "
                "ltmp_core.calibrate(model, images) or apply the plan in mode='static'"
            )
        if self.mode == "soft":
            return lambda score, eligible: threshold_mask(score, sign * param, layer.tau)
        return lambda score, eligible: (score > sign * param).float()

    def _compact(self, t: Tokens, n_keep: int | None, fused: bool) -> Tensor:
        """Drop dead tokens: live ones move to the front in order; pad to the longest row."""
        alive = t.alive > 0.5
        b, n = alive.shape
        counts = alive.sum(dim=1)
        padded = False
        if n_keep is None:
            lo, hi = (int(v) for v in counts.aminmax())
            n_keep, padded = hi, lo != hi
        pos = torch.arange(n, device=alive.device)
        key = torch.where(alive, pos, pos + n)
        idx = key.topk(n_keep, dim=1, largest=False, sorted=True).indices
        x = t.x.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.x.shape[-1]))
        if fused or self.size is not None:
            self.size = t.size.gather(1, idx)
        self.alive = alive.gather(1, idx).float() if padded else None
        if self.tracing:
            self._follow(t, idx)
        self.counts.append(counts.float() if self.mode != "static" else n_keep)
        return x

    def _follow(self, t: Tokens, idx: Tensor) -> None:
        """Move every patch to the position of the token that holds it after this block."""
        b, n = t.alive.shape
        new_pos = torch.full((b, n), -1, dtype=torch.long, device=idx.device)
        new_pos.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
        held = self.owner
        live = held >= 0
        routed = torch.where(live, t.route.gather(1, held.clamp_min(0)), held)
        via = torch.where(live, t.fate.gather(1, held.clamp_min(0)), torch.zeros_like(held))
        owner = torch.where(routed >= 0, new_pos.gather(1, routed.clamp_min(0)), torch.full_like(routed, -1))
        fate = torch.where(live & (owner < 0), torch.full_like(self.fate, PRUNED), self.fate)
        fate = torch.where((via == SQUEEZED) & (fate == KEPT) & (owner >= 0), torch.full_like(fate, SQUEEZED), fate)
        self.owner, self.fate = owner, fate
        self.trace.append((owner.cpu(), fate.cpu()))

    def no_reduction(self, x: Tensor) -> None:
        last = self.counts[-1]
        self.counts.append(last)
        if self.tracing:
            self.trace.append((self.owner.cpu(), self.fate.cpu()))
        if self.mode == "soft":
            own = last.detach() if isinstance(last, Tensor) else torch.full((self.batch,), float(last), device=x.device)
            self.own.append(own - self.num_prefix)


def _importance(attn: Tensor, alive: Tensor | None, num_prefix: int) -> Tensor:
    """Attention each token receives, relative to a uniform share; ``+inf`` on prefix tokens.

    LTMP's importance is the mean attention a token receives (over heads and live queries). Those
    means sum to one over the live tokens, so their scale is ``1 / n``: an image that already lost
    tokens would look more important everywhere. Multiplying by the live count ``n`` keeps the order
    within an image (the same tokens are pruned for a given count) and makes one threshold mean the
    same in every image and layer: a score of 1 is an average token. ``attn`` is ``[B, H, Nq, Nk]``
    (every query, mean importance) or ``[B, H, 1, Nk]`` (the class query: class importance).
    """
    attn = attn.detach()
    heads, queries = attn.shape[1], attn.shape[2]
    if queries == 1:  # the class token's attention: one row, already over live keys only
        n = attn.shape[-1] if alive is None else (alive.detach() > 0.5).sum(dim=1, keepdim=True).float()
        imp = attn[:, :, 0].float().mean(dim=1) * n
    elif alive is None:
        imp = attn.float().sum(dim=(1, 2)) / heads  # mean over queries times n: a plain sum
    else:
        w = (alive.detach() > 0.5).to(attn.dtype)
        imp = torch.einsum("bhqk,bq->bk", attn, w).float() / heads
    return imp.index_fill(1, torch.arange(num_prefix, device=imp.device), math.inf)


def _attend(attn: nn.Module, x: Tensor, st: _State, importance_kind: str | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """timm's ``Attention.forward`` with proportional attention and token masks.

    ``importance_kind``: ``None`` (no stage needs scores), ``mean`` (the full attention map) or
    ``cls`` (the class query's row alone, so the attention itself stays fused). Returns the
    attention output, the keys ``[B, H, N, d]`` and the importance scores (or ``None``).
    """
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    pack = st.padding()
    qkv = attn.qkv(x) if pack is None else _packed(attn.qkv, x, *pack)  # padded: live tokens only
    qkv = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if st.size is None else st.size.log().to(q.dtype)[:, None, None, :]
    alive = st.alive
    soft = st.mode == "soft" and alive is not None

    def normalise(logits: Tensor) -> Tensor:
        if bias is not None:
            logits = logits + bias
        if alive is None:
            return logits.softmax(dim=-1)
        if soft:
            return masked_softmax(logits, alive[:, None, None, :].to(logits.dtype))
        return logits.masked_fill(alive[:, None, None, :] <= 0.5, float("-inf")).softmax(dim=-1)

    importance = None
    if importance_kind == "mean" or soft or not attn.fused_attn:
        probs = normalise((q * attn.scale) @ k.transpose(-2, -1))
        if importance_kind is not None:
            importance = _importance(probs[:, :, :1] if importance_kind == "cls" else probs, alive, st.num_prefix)
        out = attn.attn_drop(probs) @ v
    else:
        if importance_kind == "cls":
            importance = _importance(normalise((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)), alive, st.num_prefix)
        mask = bias
        if alive is not None:
            pad = torch.zeros_like(alive, dtype=q.dtype).masked_fill(alive <= 0.5, float("-inf"))[:, None, None, :]
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    out = out.transpose(1, 2).reshape(b, n, h * d)
    if pack is not None and getattr(attn, "gate", None) is None:
        return _packed(lambda o: _attn_out(attn, o, None), out, *pack), k, importance
    return _attn_out(attn, out, x), k, importance


def _attn_out(attn: nn.Module, out: Tensor, x: Tensor | None) -> Tensor:
    """timm's tail of the attention: scale-norm, optional gate, projection."""
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _packed(fn, t: Tensor, live: Tensor, pad: Tensor) -> Tensor:
    """A token-wise ``fn`` on the live tokens of a padded batch only; padding rows come back zero."""
    b, n, c = t.shape
    done = fn(t.reshape(b * n, c).index_select(0, live))
    out = done.new_empty(b * n, done.shape[-1])
    out.index_copy_(0, live, done)
    out.index_fill_(0, pad, 0)
    return out.view(b, n, -1)


class LTMPBlock(Block):
    """timm's pre-norm ``Block`` with a token reduction between attention and MLP."""

    _ltmp: _State
    _ltmp_index: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise LTMPError("a patched block takes no attention mask or causal flag; it masks tokens itself")
        st = self._ltmp
        index = self._ltmp_index
        if index == 0:
            st.start(x)
        layer = st.plan.layers[index]
        stages = layer.stages
        kind = layer.importance if any(REDUCERS[s].needs_importance for s in stages) else None
        y, k, importance = _attend(self.attn, self.norm1(x), st, kind)
        x = x + self.drop_path1(self.ls1(y))
        if stages:
            x = st.reduce(self, index, x, k, importance)
        else:
            st.no_reduction(x)
        pack = st.padding()
        if pack is not None:  # padded batch (dynamic mode): the MLP runs on the live tokens only
            return x + _packed(lambda t: self.drop_path2(self.ls2(self.mlp(self.norm2(t)))), x, *pack)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _PatchedModel:
    """Mixin for the model class: size-weighted, padding-aware average and max pooling."""

    _ltmp: _State
    _ltmp_base: type

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        st = self._ltmp
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("token", "") or (st.size is None and st.alive is None):
            return super().pool(x, pool_type)  # type: ignore[misc]
        b, n, _ = x.shape
        weight = torch.ones(b, n, device=x.device, dtype=torch.float32)
        if st.size is not None:
            weight = weight * st.size
        if st.alive is not None:
            weight = weight * st.alive
        if not self.pool_include_prefix:
            x, weight = x[:, self.num_prefix_tokens:], weight[:, self.num_prefix_tokens:]
        w = weight.to(x.dtype).unsqueeze(-1)
        avg = (x * w).sum(dim=1) / w.sum(dim=1)
        if pool_type == "avg":
            return avg
        mx = x.masked_fill(w <= 0, float("-inf")).amax(dim=1)
        if pool_type == "max":
            return mx
        return 0.5 * (mx + avg)  # avgmax


_MODEL_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:
        _MODEL_CLASSES[cls] = type(f"LTMP{cls.__name__}", (_PatchedModel, cls), {"_ltmp_base": cls})
    return _MODEL_CLASSES[cls]


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply_plan` has patched ``model``."""
    return isinstance(model, _PatchedModel)


def _state(model: nn.Module) -> _State:
    if not is_patched(model):
        raise LTMPError("model: not patched; call ltmp_core.apply_plan(model, plan) first")
    return model._ltmp


def apply_plan(model: nn.Module, plan: ReductionPlan, mode: str = "static") -> nn.Module:
    """Patch a timm ViT in place to reduce tokens as ``plan`` says; returns the model.

    Thresholds in the plan become parameters of the blocks (``blocks.i.merge_threshold``,
    ``blocks.i.prune_threshold``); thresholds the plan lacks must be calibrated
    (:func:`calibrate`) before soft or dynamic mode can run. A model that is already patched is
    re-patched with the new plan.

    Raises:
        LTMPError: the model is not a supported timm ViT, the plan does not fit it, or ``mode``
            needs thresholds the plan lacks.
    """
    check_model(model)
    if mode not in MODES:
        raise LTMPError(f"mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if not isinstance(plan, ReductionPlan):
        raise LTMPError(f"plan: expected a ReductionPlan, got {type(plan).__name__}")
    if model.global_pool not in ("token", "") and not hasattr(type(model), "pool"):
        raise LTMPError("model: average or max pooling needs timm's VisionTransformer.pool (upgrade timm)")
    depth = len(model.blocks)
    if plan.depth != depth:
        raise LTMPError(f"plan: {plan.depth} layers, but the model has {depth} blocks")
    if getattr(model, "cls_token", None) is None:
        for i, layer in enumerate(plan.layers):
            if layer.importance == "cls" and any(REDUCERS[s].needs_importance for s in layer.stages):
                raise LTMPError(f"layers[{i}].importance: 'cls' needs a class token, and this model has none")
    if is_patched(model):
        remove_plan(model)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    st = _State(plan, mode, int(model.num_prefix_tokens))
    model.__class__ = _patched_class(type(model))
    model._ltmp = st
    for i, (block, layer) in enumerate(zip(model.blocks, plan.layers)):
        block.__class__ = LTMPBlock
        block._ltmp = st
        block._ltmp_index = i
        for name in layer.needs():
            value = getattr(layer, name)
            block.register_parameter(
                name, nn.Parameter(torch.tensor(math.nan if value is None else value, device=device)))
            if value is not None:
                st.known.add((i, name))
    try:
        set_mode(model, mode)
    except LTMPError:
        remove_plan(model)
        raise
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan`: the model is stock timm again (thresholds are dropped)."""
    if not is_patched(model):
        return model
    for block in model.blocks:
        for name in ("merge_threshold", "prune_threshold"):
            if name in block._parameters:
                del block._parameters[name]
        for attr in ("_ltmp", "_ltmp_index"):
            block.__dict__.pop(attr, None)
        block.__class__ = Block
    model.__dict__.pop("_ltmp", None)
    model.__class__ = type(model)._ltmp_base
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch a patched model between ``soft``, ``dynamic`` and ``static``; returns the model."""
    st = _state(model)
    if mode not in MODES:
        raise LTMPError(f"mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode != "static":
        for i, layer in enumerate(st.plan.layers):
            for name in layer.needs():
                if (i, name) not in st.known:
                    raise LTMPError(
                        f"layers[{i}].{name}: not set, and mode {mode!r} needs it; calibrate the thresholds "
                        "with ltmp_core.calibrate(model, images) or use mode='static'"
                    )
    st.mode = mode
    return model


def get_mode(model: nn.Module) -> str:
    """The current mode of a patched model."""
    return _state(model).mode


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned thresholds of a patched model (two scalars per block at most)."""
    _state(model)
    return [
        p for block in model.blocks for name in ("merge_threshold", "prune_threshold")
        if (p := block._parameters.get(name)) is not None
    ]


def threshold_scales(model: nn.Module) -> list[float]:
    """How far each threshold must move to change its cut noticeably, from the calibration batch.

    The score gap spanned by the 10% of eligible tokens on either side of the calibrated cut
    (:func:`ltmp_core.masking.threshold_between`); aligned with :func:`threshold_parameters`, 1.0
    for thresholds that were not calibrated. Scores differ in scale between layers and models (an
    untrained model's similarities all sit near 1), so an optimiser should move each threshold in
    these units.
    """
    st = _state(model)
    return [
        st.scales.get((i, name), 1.0) for i, block in enumerate(model.blocks)
        for name in ("merge_threshold", "prune_threshold") if block._parameters.get(name) is not None
    ]


def get_plan(model: nn.Module) -> ReductionPlan:
    """The model's plan with the thresholds it holds now (learned or calibrated)."""
    st = _state(model)
    values: dict[str, list[float | None]] = {"merge_threshold": [], "prune_threshold": []}
    for i, (block, layer) in enumerate(zip(model.blocks, st.plan.layers)):
        for name in values:
            known = name in layer.needs() and (i, name) in st.known
            values[name].append(float(block._parameters[name].detach()) if known else None)
    return st.plan.with_layers(**values)


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor | Iterable[Any]) -> ReductionPlan:
    """Set every threshold so that each layer keeps its planned budget on ``images``.

    Runs the model once in dynamic mode, layer by layer: each threshold is placed between the
    scores of the tokens the budget removes and those it keeps, pooled over the batch (a quantile of
    the scores), before that layer reduces. ``images`` is a batch tensor, or an iterable of batches
    or ``(images, targets)`` pairs of which the first batch is used. Returns :func:`get_plan`.
    """
    st = _state(model)
    if not isinstance(images, Tensor):
        first = next(iter(images))
        images = first[0] if isinstance(first, (list, tuple)) else first
    param = next(iter(model.parameters()))
    previous, was_training = st.mode, model.training
    st.mode = _CALIBRATE
    model.eval()
    try:
        model(images.to(param.device))
    finally:
        st.mode = previous
        model.train(was_training)
    return get_plan(model)


def token_counts(model: nn.Module) -> Tensor:
    """Tokens per image, prefix included, in the last forward pass: ``[depth + 1, B]``.

    Row 0 is the input of the first block; row ``l + 1`` is what block ``l`` passes to its MLP and
    to the next block. In soft mode the counts are sums of the (straight-through) masks and carry
    gradients to the thresholds.
    """
    st = _state(model)
    if not st.counts:
        raise LTMPError("model: no forward pass has run since the plan was applied")
    ref = next((c for c in st.counts if isinstance(c, Tensor)), None)
    device = ref.device if ref is not None else next(iter(model.parameters())).device
    rows = [c.float() if isinstance(c, Tensor) else torch.full((st.batch,), float(c), device=device)
            for c in st.counts]
    return torch.stack(rows)


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
    finally:
        st.tracing = False
    owner = torch.stack([o for o, _ in st.trace])
    fate = torch.stack([f for _, f in st.trace])
    ph, pw = model.patch_embed.patch_size
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    st.trace, st.owner, st.fate = [], None, None
    return TokenTrace(owner, fate, grid)
