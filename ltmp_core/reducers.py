"""Token reducers as pure functions of tensors: merge (LTMP/ToMe), prune (LTMP), squeeze (TPS).

Every reducer takes a :class:`Tokens` bundle and a ``decide`` function and returns a new bundle of
the same length: removed tokens are marked dead in ``alive`` (0) and, for merge and squeeze, their
content is fused into a surviving token. Whether the caller then drops dead tokens (hard modes) or
keeps them masked (soft mode) is the caller's business, so one implementation serves all modes.

``decide(score, eligible)`` returns removal weights in [0, 1] (exactly 0 where not eligible): a
threshold with a straight-through sigmoid in soft mode, a hard threshold in dynamic mode, top-k in
static mode. Higher scores are removed first.

Static mode (every image keeps the same counts) has a second, faster form of each built-in stage:
``static(tokens, r) -> tokens`` on a :class:`Compact` sequence, in which every token is live and in
sequence order. It removes exactly ``r`` tokens and returns the shorter sequence, with index arithmetic
on strided views instead of masks over the full length, so a block costs a few small kernels besides
its GEMMs (the batch-1 latency of a deployed plan). It computes what the masked form followed by
compaction computes, up to float rounding (tested against it); a stage registered without one runs
the masked form in static mode too.

The registry :data:`REDUCERS` maps a stage name to its functions and what it needs; an operation in
``ltmp_core.plan.OPS`` is a sequence of registered stages.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Tokens", "Compact", "Reducer", "REDUCERS", "register_reducer", "merge", "prune", "squeeze", "top_k_mask",
    "KEPT", "MERGED", "PRUNED", "SQUEEZED",
]

Decide = Callable[[Tensor, Tensor], Tensor]
StaticFn = Callable[["Compact", int], "Compact"]

#: How a token left a block (``Tokens.fate``).
KEPT, MERGED, PRUNED, SQUEEZED = 0, 1, 2, 3


@dataclass
class Tokens:
    """The token sequence of a batch, as a reducer sees it.

    Attributes:
        x: Token features, ``[B, N, C]``.
        size: Patches each token stands for, ``[B, N]`` (proportional attention weights).
        alive: 1 for tokens present, 0 for removed or padding, ``[B, N]``; may carry
            straight-through gradients in soft mode.
        metric: Unit-norm similarity features (attention keys averaged over heads), ``[B, N, d]``.
        importance: Mean attention each token receives, ``[B, N]``; ``+inf`` on prefix tokens.
            ``None`` when no stage of the layer needs it.
        num_prefix: Leading class/distillation/register tokens, never reduced.
        route: Optional, ``[B, N]``: where each token of the block's input went (its own index, the
            index of the token it was merged or squeezed into, or -1 if pruned). ``None``: not traced.
        fate: Optional, ``[B, N]``: how each input token left (:data:`KEPT`, :data:`MERGED`,
            :data:`PRUNED`, :data:`SQUEEZED`).
        needs_metric, needs_importance: Whether a later stage of the block reads these after a fusion;
            when not, fusing skips them (their values are then stale).
        order: Optional, ``[B, N]`` integer keys: the sequence order of the tokens when it is not their
            position (a ``tome``-order merge moves its destinations behind the unmerged sources; hard
            modes then gather in this order, soft mode keeps the keys).
        merge_order: ``keep`` or ``tome`` (:data:`ltmp_core.plan.MERGE_ORDERS`).
        squeeze_host: ``keys`` or ``tps`` (:data:`ltmp_core.plan.SQUEEZE_HOSTS`).
    """

    x: Tensor
    size: Tensor
    alive: Tensor
    metric: Tensor
    importance: Tensor | None
    num_prefix: int
    route: Tensor | None = None
    fate: Tensor | None = None
    needs_metric: bool = True  # a later stage of the block reads the (fused) similarity metric
    needs_importance: bool = True  # a later stage of the block reads the (fused) importance
    order: Tensor | None = None
    merge_order: str = "keep"
    squeeze_host: str = "keys"

    def candidates(self) -> Tensor:
        """Live patch tokens: the only tokens a reducer may touch, ``[B, N]`` bool."""
        n = self.alive.shape[1]
        patch = torch.arange(n, device=self.alive.device) >= self.num_prefix
        return (self.alive.detach() > 0.5) & patch

    def rank(self) -> Tensor:
        """Rank of every live patch token in sequence order (0, 1, ...), ``[B, N]``; junk elsewhere."""
        cand = self.candidates()
        if self.order is None:  # the sequence order is the position order
            return cand.long().cumsum(1) - 1
        key = torch.where(cand, self.order, self.order.amax(dim=1, keepdim=True) + 1)
        perm = key.argsort(dim=1, stable=True)
        positions = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
        return torch.empty_like(perm).scatter_(1, perm, positions)


@dataclass(frozen=True)
class Reducer:
    """A registered reducer stage.

    Attributes:
        name: Stage name used in operations (``merge``, ``prune``, ``squeeze``).
        fn: ``fn(tokens, decide) -> tokens``.
        threshold: Which learned threshold of a block drives it (``merge_threshold`` or
            ``prune_threshold``).
        needs_importance: Needs the attention map (mean attention received).
        similarities: Number of ``N x N`` similarity matrices it computes (for the FLOP model).
        static: ``static(tokens, r) -> tokens``: the stage on a :class:`Compact` sequence, removing
            exactly ``r`` tokens (static mode's fast form), or ``None``.
    """

    name: str
    fn: Callable[[Tokens, Decide], Tokens]
    threshold: str
    needs_importance: bool
    similarities: int
    static: StaticFn | None = None


REDUCERS: dict[str, Reducer] = {}


def register_reducer(name: str, *, threshold: str, needs_importance: bool, similarities: int,
                     static: StaticFn | None = None):
    """Register ``fn(tokens, decide) -> tokens`` as the reducer stage ``name``.

    ``static``, optional, is the stage's fast form for static mode (see the module's docstring);
    without it static mode runs ``fn`` with a top-k ``decide`` and compacts. Registering a name again
    replaces the stage, with a warning (as timm's model registry does).
    """
    if threshold not in ("merge_threshold", "prune_threshold"):
        raise ValueError(f"threshold must be merge_threshold or prune_threshold, got {threshold!r}")

    def wrap(fn: Callable[[Tokens, Decide], Tokens]) -> Callable[[Tokens, Decide], Tokens]:
        if name in REDUCERS:
            warnings.warn(f"Overwriting reducer stage {name!r} ({REDUCERS[name].fn.__qualname__}) "
                          f"with {fn.__qualname__}", stacklevel=2)
        REDUCERS[name] = Reducer(name, fn, threshold, needs_importance, similarities, static)
        return fn

    return wrap


def top_k_mask(score: Tensor, eligible: Tensor, k: int) -> Tensor:
    """Removal weights that remove the ``k`` highest-scoring eligible tokens of every row.

    ``k`` must not exceed the number of eligible tokens in any row (static mode guarantees it).
    """
    out = torch.zeros_like(score, dtype=torch.float32)
    if k <= 0:
        return out
    idx = score.float().masked_fill(~eligible, float("-inf")).topk(k, dim=1).indices
    return out.scatter_(1, idx, 1.0)


def _similarity(metric: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Best cosine similarity of every token to a token in ``columns``, and that token's index.

    Scores carry no gradient: a threshold learns through its own mask only, not by moving the
    features that earlier thresholds shaped (LTMP detaches its scores too).
    """
    metric = metric.detach()
    sim = metric @ metric.transpose(1, 2)
    sim = sim.float().masked_fill(~columns[:, None, :], float("-inf"))
    return sim.max(dim=-1)


def _reroute(t: Tokens, remove: Tensor, dest: Tensor | None, code: int) -> dict[str, Tensor]:
    """Follow removed tokens to ``dest`` (or to nowhere, -1) in a traced bundle."""
    if t.route is None or t.fate is None:
        return {}
    removed = remove.detach() > 0.5
    stage = torch.arange(removed.shape[1], device=removed.device).expand_as(removed)
    stage = torch.where(removed, dest if dest is not None else torch.full_like(stage, -1), stage)
    route = torch.where(t.route >= 0, stage.gather(1, t.route.clamp_min(0)), t.route)
    fate = torch.where(removed & (t.fate == KEPT), torch.full_like(t.fate, code), t.fate)
    return {"route": route, "fate": fate}


def _fuse(t: Tokens, remove: Tensor, dest: Tensor, weight: Tensor, host_weight: Tensor, code: int,
          grow: bool = True) -> Tokens:
    """Remove tokens with weights ``remove`` and fold them into ``dest``.

    The host ``j`` becomes ``(hw_j x_j + sum_i r_i w_i x_i) / (hw_j + sum_i r_i w_i)`` over the
    tokens ``i`` with ``dest[i] = j``; with ``grow`` its size grows by ``sum_i r_i size_i``. Tokens
    that receive nothing are left bit-for-bit unchanged.
    """
    wr = remove * weight
    acc_w = torch.zeros_like(wr).scatter_add_(1, dest, wr)
    got = acc_w > 0
    idx = dest.unsqueeze(-1)

    def fold(v: Tensor) -> Tensor:
        w = wr.to(v.dtype).unsqueeze(-1)
        acc = torch.zeros_like(v).scatter_add_(1, idx.expand_as(v), w * v)
        hw = host_weight.to(v.dtype).unsqueeze(-1)
        folded = (hw * v + acc) / (hw + acc_w.to(v.dtype).unsqueeze(-1))
        return torch.where(got.unsqueeze(-1), folded, v)

    x = fold(t.x)
    metric = t.metric
    if t.needs_metric:
        metric = fold(metric)
        metric = torch.where(got.unsqueeze(-1), metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6), metric)
    size = t.size
    if grow:
        moved = remove * t.size * (weight > 0)
        size = t.size + torch.zeros_like(t.size).scatter_add_(1, dest, moved)
    importance = t.importance
    if importance is not None and t.needs_importance:
        # A host is as important as the most important token it absorbed (LTMP).
        src = torch.where(remove.detach() > 0.5, importance, torch.full_like(importance, -math.inf))
        importance = importance.scatter_reduce(1, dest, src, reduce="amax", include_self=True)
    return replace(t, x=x, size=size, alive=t.alive * (1 - remove), metric=metric, importance=importance,
                   **_reroute(t, remove, dest, code))


# -- static mode's fast forms: every token live, in sequence order, the same count in every image ---------


@dataclass
class Compact:
    """A static-mode token sequence: every token is live and in sequence order.

    Attributes:
        x: Token features, ``[B, N, C]``.
        size: Patches each token stands for, ``[B, N]``, or ``None`` while every token is one patch.
        keys: The attention keys of the block, ``[B, H, N, d]`` (the similarity metric is their mean
            over heads, made unit-norm on first use: :meth:`unit_metric`).
        importance: Importance scores, ``[B, N]`` (prefix entries are ignored), or ``None``.
        num_prefix, merge_order, squeeze_host, needs_metric, needs_importance: as in :class:`Tokens`.
    """

    x: Tensor
    size: Tensor | None
    keys: Tensor | None
    importance: Tensor | None
    num_prefix: int
    merge_order: str = "keep"
    squeeze_host: str = "keys"
    needs_metric: bool = True
    needs_importance: bool = True
    metric: Tensor | None = None

    def unit_metric(self) -> Tensor:
        """Unit-norm similarity features, ``[B, N, d]`` (computed from the keys once)."""
        if self.metric is None:
            if self.keys is None:
                raise ValueError("merge and squeeze need the attention keys")
            m = self.keys.mean(dim=1)
            self.metric = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.metric


def _gather_rows(v: Tensor, idx: Tensor) -> Tensor:
    """``v[b, idx[b, i]]`` for ``v`` of shape ``[B, N]`` or ``[B, N, C]``."""
    if v.dim() == 2:
        return v.gather(1, idx)
    return v.gather(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))


def _fold_into(host: Tensor, host_w: Tensor, moved: Tensor, moved_w: Tensor, dest: Tensor) -> Tensor:
    """``(hw_j h_j + sum_i w_i m_i) / (hw_j + sum_i w_i)`` over the moved tokens ``i`` with ``dest[i] = j``."""
    w = moved_w.to(host.dtype)
    hw = host_w.to(host.dtype)
    num = (host * hw.unsqueeze(-1)).scatter_add(1, dest.unsqueeze(-1).expand_as(moved), moved * w.unsqueeze(-1))
    den = hw.scatter_add(1, dest, w)
    return num / den.unsqueeze(-1)


def _fold_importance(host: Tensor, moved: Tensor, dest: Tensor) -> Tensor:
    """A host is as important as the most important token it absorbed (LTMP)."""
    return host.scatter_reduce(1, dest, moved, reduce="amax", include_self=True)


def _static_merge(t: Compact, r: int) -> Compact:
    """:func:`merge` on a compact sequence: the ``r`` best-matched sources join their destinations."""
    if r <= 0:
        return t
    p, n = t.num_prefix, t.x.shape[1]
    # Sources: odd patch ranks ("keep"), or even positions of the whole sequence ("tome", ToMe's split).
    first_src = p + 1 if t.merge_order == "keep" or p % 2 == 1 else p
    first_dst = p + (first_src == p)
    src, dst = slice(first_src, n, 2), slice(first_dst, n, 2)
    metric = t.unit_metric().detach()
    best, dest = (metric[:, src] @ metric[:, dst].transpose(1, 2)).float().max(dim=-1)
    ranked = best.argsort(dim=1, descending=True)
    merged, kept = ranked[:, :r], ranked[:, r:].sort(dim=1).values
    into = dest.gather(1, merged)
    x_src, x_dst = t.x[:, src], t.x[:, dst]
    if t.size is None:
        ones = x_src.new_ones(x_src.shape[:2], dtype=torch.float32)
        s_src, s_dst = ones, x_dst.new_ones(x_dst.shape[:2], dtype=torch.float32)
    else:
        s_src, s_dst = t.size[:, src], t.size[:, dst]
    s_moved = _gather_rows(s_src, merged)

    def fold(v_src: Tensor, v_dst: Tensor) -> Tensor:
        return _fold_into(v_dst, s_dst, _gather_rows(v_src, merged), s_moved, into)

    new_dst = {"x": fold(x_src, x_dst), "size": s_dst.scatter_add(1, into, s_moved)}
    parts: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # name: (prefix, sources, new destinations)
    if t.needs_metric:
        m = fold(metric[:, src], metric[:, dst])
        new_dst["metric"] = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    if t.needs_importance and t.importance is not None:
        imp_src = t.importance[:, src]
        new_dst["importance"] = _fold_importance(t.importance[:, dst], _gather_rows(imp_src, merged), into)
    full = {"x": t.x, "size": t.size, "metric": metric, "importance": t.importance}
    for name, v_dst in new_dst.items():
        v = full[name]
        if v is None:  # sizes while all were one patch
            v = v_dst.new_ones(v_dst.shape[0], n)
        parts[name] = (v[:, :p], v[:, src], v_dst)
    out: dict[str, Tensor] = {}
    if t.merge_order == "tome":  # prefix, unmerged sources, destinations (ToMe's cat([unm, dst]))
        for name, (pre, v_src, v_dst) in parts.items():
            out[name] = torch.cat([pre, _gather_rows(v_src, kept), v_dst], dim=1)
    else:  # sequence order: the unmerged sources stay between the destinations
        b = t.x.shape[0]
        pos = torch.arange(n, device=t.x.device)
        order = torch.cat([pos[:p].expand(b, -1), pos[src][kept], pos[dst].expand(b, -1)], dim=1)
        order = order.argsort(dim=1)
        for name, (pre, v_src, v_dst) in parts.items():
            out[name] = _gather_rows(torch.cat([pre, _gather_rows(v_src, kept), v_dst], dim=1), order)
    return replace(t, x=out["x"], size=out["size"], metric=out.get("metric"), keys=None,
                   importance=out.get("importance"))


def _static_prune_split(t: Compact, r: int) -> tuple[Tensor, Tensor]:
    """Patch-token indices (from 0 after the prefix) of the kept tokens in sequence order and of the
    ``r`` least important ones."""
    if t.importance is None:
        raise ValueError("prune and squeeze need importance scores")
    ranked = t.importance[:, t.num_prefix:].argsort(dim=1, descending=True)
    keep = ranked.shape[1] - r
    return ranked[:, :keep].sort(dim=1).values, ranked[:, keep:]


def _static_select(t: Compact, kept: Tensor, **new: Tensor) -> Compact:
    """The prefix and the kept patch tokens of every per-token field (``new`` replaces the kept part)."""
    p = t.num_prefix
    fields = {"x": t.x, "size": t.size, "importance": t.importance if t.needs_importance else None,
              "metric": t.metric if t.needs_metric else None}
    out = {}
    for name, v in fields.items():
        if v is None and name not in new:
            out[name] = None
            continue
        part = new[name] if name in new else _gather_rows(v[:, p:], kept)
        pre = v[:, :p] if v is not None else part.new_ones(part.shape[0], p)
        out[name] = torch.cat([pre, part], dim=1)
    keys = t.keys if t.keys is not None and t.needs_metric and t.metric is None else None
    if keys is not None:
        out["metric"] = None
        keys = torch.cat([keys[:, :, :p], keys[:, :, p:].gather(
            2, kept[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))], dim=2)
    return replace(t, keys=keys, **out)


def _static_prune(t: Compact, r: int) -> Compact:
    """:func:`prune` on a compact sequence: the ``r`` least important patch tokens go."""
    if r <= 0:
        return t
    kept, _ = _static_prune_split(t, r)
    return _static_select(t, kept)


def _static_squeeze(t: Compact, r: int) -> Compact:
    """:func:`squeeze` on a compact sequence: the ``r`` least important patch tokens join their hosts."""
    if r <= 0:
        return t
    kept, pruned = _static_prune_split(t, r)
    p = t.num_prefix
    x = t.x[:, p:]
    x_host, x_moved = _gather_rows(x, kept), _gather_rows(x, pruned)
    size = t.size[:, p:] if t.size is not None else x.new_ones(x.shape[:2], dtype=torch.float32)
    s_host, s_moved = _gather_rows(size, kept), _gather_rows(size, pruned)
    new: dict[str, Tensor] = {}
    if t.squeeze_host == "tps":
        f_host, f_moved = (v.detach().float() for v in (x_host, x_moved))
        f_host = f_host / (f_host.norm(dim=-1, keepdim=True) + 1e-6)
        f_moved = f_moved / (f_moved.norm(dim=-1, keepdim=True) + 1e-6)
        best, dest = (f_moved @ f_host.transpose(1, 2)).max(dim=-1)
        w, hw = torch.exp(best), torch.full_like(s_host, math.e)
        if t.size is not None:
            new["size"] = s_host
    else:
        metric = t.unit_metric().detach()[:, p:]
        best, dest = (_gather_rows(metric, pruned) @ _gather_rows(metric, kept).transpose(1, 2)).float().max(dim=-1)
        w, hw = torch.exp(best) * s_moved, math.e * s_host
        new["size"] = s_host.scatter_add(1, dest, s_moved)
    if t.needs_metric:
        metric = t.unit_metric()[:, p:]
        m = _fold_into(_gather_rows(metric, kept), hw, _gather_rows(metric, pruned), w, dest)
        new["metric"] = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    new["x"] = _fold_into(x_host, hw, x_moved, w, dest)
    if t.needs_importance and t.importance is not None:
        imp = t.importance[:, p:]
        new["importance"] = _fold_importance(_gather_rows(imp, kept), _gather_rows(imp, pruned), dest)
    return _static_select(t, kept, **new)


@register_reducer("merge", threshold="merge_threshold", needs_importance=False, similarities=1,
                  static=_static_merge)
def merge(t: Tokens, decide: Decide) -> Tokens:
    """Bipartite threshold merging (LTMP; ToMe's matching).

    Live patch tokens alternate, in sequence order, between a source and a destination set; each
    source's score is its best cosine similarity to a destination, and the sources ``decide`` removes
    are averaged into their match, weighted by size. The parity: with ``merge_order="keep"`` the odd
    patch tokens are sources; with ``"tome"`` the split runs over the whole sequence, prefix tokens
    included, and tokens at even positions are sources (ToMe's ``a = x[..., ::2, :]``), after which
    the sequence becomes the unmerged sources, then the destinations (ToMe's ``cat([unm, dst])``).
    """
    cand = t.candidates()
    offset = t.num_prefix + 1 if t.merge_order == "tome" else 0
    odd = (t.rank() + offset) % 2 == 1
    src, dst = cand & odd, cand & ~odd
    best, dest = _similarity(t.metric, dst)
    eligible = src & dst.any(dim=1, keepdim=True)
    remove = decide(best.masked_fill(~eligible, 0.0), eligible) * eligible
    out = _fuse(t, remove, dest, t.size, t.size, MERGED)
    if t.merge_order == "tome":
        n = t.alive.shape[1]
        base = t.order if t.order is not None else torch.arange(n, device=dst.device).expand_as(dst)
        out.order = torch.where(dst, base + base.amax(dim=1, keepdim=True) + 1, base)
    return out


def _prune_weights(t: Tokens, decide: Decide) -> Tensor:
    """Removal weights of the least important live patch tokens; the most important one stays."""
    if t.importance is None:
        raise ValueError("prune and squeeze need importance scores")
    cand = t.candidates()
    top = t.importance.masked_fill(~cand, float("-inf")).argmax(dim=1, keepdim=True)
    eligible = cand.scatter(1, top, False)
    score = (-t.importance).masked_fill(~eligible, 0.0)
    return decide(score, eligible) * eligible


@register_reducer("prune", threshold="prune_threshold", needs_importance=True, similarities=0,
                  static=_static_prune)
def prune(t: Tokens, decide: Decide) -> Tokens:
    """Threshold pruning on importance (LTMP): tokens that receive little attention are dropped."""
    remove = _prune_weights(t, decide)
    return replace(t, alive=t.alive * (1 - remove), **_reroute(t, remove, None, PRUNED))


@register_reducer("squeeze", threshold="prune_threshold", needs_importance=True, similarities=1,
                  static=_static_squeeze)
def squeeze(t: Tokens, decide: Decide) -> Tokens:
    """Prune, then fuse every pruned token into its most similar kept token (TPS).

    With ``squeeze_host="tps"`` this is TPS's squeeze: the host is the kept token of highest cosine
    similarity ``c`` of the token features, and a host ``k`` with fused tokens ``j`` becomes
    ``(e x_k + sum_j exp(c_jk) x_j) / (e + sum_j exp(c_jk))`` (the host weighs ``e = exp(1)``, its
    self-similarity); sizes do not change. With ``"keys"`` (this project's) the similarity is on the
    attention keys, as merging's, and every weight is multiplied by the token's size, whose sum the
    host takes over, so merged tokens count for what they stand for and feed proportional attention.
    """
    remove = _prune_weights(t, decide)
    hosts = t.candidates() & (remove.detach() < 0.5)
    if t.squeeze_host == "tps":
        features = t.x.detach().float()
        features = features / (features.norm(dim=-1, keepdim=True) + 1e-6)
        best, dest = _similarity(features, hosts)
        weight = torch.exp(best)  # exp(-inf) = 0: with no host a token is simply pruned
        return _fuse(t, remove, dest, weight, torch.full_like(t.size, math.e), SQUEEZED, grow=False)
    best, dest = _similarity(t.metric, hosts)
    weight = torch.exp(best) * t.size
    return _fuse(t, remove, dest, weight, math.e * t.size, SQUEEZED)
