"""Token reducers as pure functions of tensors: merge (LTMP/ToMe), prune (LTMP), squeeze (TPS).

Every reducer takes a :class:`Tokens` bundle and a ``decide`` function and returns a new bundle of
the same length: removed tokens are marked dead in ``alive`` (0) and, for merge and squeeze, their
content is fused into a surviving token. Whether the caller then drops dead tokens (hard modes) or
keeps them masked (soft mode) is the caller's business, so one implementation serves all modes.

``decide(score, eligible)`` returns removal weights in [0, 1] (exactly 0 where not eligible): a
threshold with a straight-through sigmoid in soft mode, a hard threshold in dynamic mode, top-k in
static mode. Higher scores are removed first.

Static mode (every image keeps the same counts) has a second, faster form of each built-in stage:
``static(tokens, r) -> tokens`` on a :class:`Compact` sequence. It removes exactly ``r`` tokens by
narrowing the sequence's index of live positions, with index arithmetic on strided halves and top-k
orders instead of masks over the full length, so a block costs a few small kernels besides its GEMMs
(the batch-1 latency of a deployed plan). It computes what the masked form followed by compaction
computes, up to float rounding (tested against it), with less similarity work: it compares only the
pairs it needs (a merge its sources with its destinations, a squeeze its pruned tokens with the kept
ones), which ``static_pairs`` tells the FLOP model. A stage registered without one runs the masked
form in static mode too.

The registry :data:`REDUCERS` maps a stage name to its functions and what it needs; an operation in
``ltmp_core.plan.OPS`` is a sequence of registered stages.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "Tokens", "Compact", "Reducer", "REDUCERS", "register_reducer", "merge", "prune", "squeeze", "top_k_mask",
    "head_mean", "unit_norm",
    "KEPT", "MERGED", "PRUNED", "SQUEEZED",
]

Decide = Callable[[Tensor, Tensor], Tensor]
StaticFn = Callable[["Compact", int], "Compact"]
PairsFn = Callable[[int, int], int]

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
        similarities: Number of ``N x N`` similarity matrices the masked form ``fn`` computes over the
            block's whole sequence (for the FLOP model).
        static: ``static(tokens, r) -> tokens``: the stage on a :class:`Compact` sequence, removing
            exactly ``r`` tokens (static mode's fast form), or ``None``.
        static_pairs: ``static_pairs(n, r)``: how many token pairs the fast form's similarity products
            compare when it removes ``r`` of ``n`` live patch tokens (for the FLOP model; 0 at ``r = 0``).
            ``None``: the FLOP model counts the masked form's ``similarities`` matrices instead.
    """

    name: str
    fn: Callable[[Tokens, Decide], Tokens]
    threshold: str
    needs_importance: bool
    similarities: int
    static: StaticFn | None = None
    static_pairs: PairsFn | None = None


REDUCERS: dict[str, Reducer] = {}


def register_reducer(name: str, *, threshold: str, needs_importance: bool, similarities: int,
                     static: StaticFn | None = None, static_pairs: PairsFn | None = None):
    """Register ``fn(tokens, decide) -> tokens`` as the reducer stage ``name``.

    ``static``, optional, is the stage's fast form for static mode (see the module's docstring);
    without it static mode runs ``fn`` with a top-k ``decide`` and compacts. ``static_pairs(n, r)``
    says how many token pairs that fast form compares (see :class:`Reducer`). Registering a name
    again replaces the stage, with a warning (as timm's model registry does).
    """
    if threshold not in ("merge_threshold", "prune_threshold"):
        raise ValueError(f"threshold must be merge_threshold or prune_threshold, got {threshold!r}")

    def wrap(fn: Callable[[Tokens, Decide], Tokens]) -> Callable[[Tokens, Decide], Tokens]:
        if name in REDUCERS:
            warnings.warn(f"Overwriting reducer stage {name!r} ({REDUCERS[name].fn.__qualname__}) "
                          f"with {fn.__qualname__}", stacklevel=2)
        REDUCERS[name] = Reducer(name, fn, threshold, needs_importance, similarities, static, static_pairs)
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


def _fold_into(host: Tensor, host_w: Tensor, moved: Tensor, moved_w: Tensor, dest: Tensor) -> Tensor:
    """``(hw_j h_j + sum_i w_i m_i) / (hw_j + sum_i w_i)`` over the moved tokens ``i`` with ``dest[i] = j``."""
    w = moved_w.to(host.dtype)
    hw = host_w.to(host.dtype)
    num = (host * hw.unsqueeze(-1)).scatter_add(1, dest.unsqueeze(-1).expand_as(moved), moved * w.unsqueeze(-1))
    return num / hw.scatter_add(1, dest, w).unsqueeze(-1)


def _by_rows(wr: Tensor, *values: Tensor) -> bool:
    """Whether :func:`_fuse` may fold only the rows that move and receive (:func:`_fold_rows`): nothing
    needs gradients (hard dynamic mode, evaluation), no graph is being compiled and the tensors hold
    values (the rows are counted on the host; meta tensors, as FLOP counters run, have none)."""
    if torch.compiler.is_compiling() or wr.is_meta:
        return False
    return not (torch.is_grad_enabled() and any(v.requires_grad for v in (wr, *values)))


def _moved_rows(wr: Tensor, dest: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The tokens with a positive removal weight, flat over the batch: ``(rows, their weights, their hosts as
    indices into the hosts, the hosts' flat rows)``."""
    b, n = wr.shape
    flat = wr.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    into = torch.div(rows, n, rounding_mode="floor") * n + dest.reshape(-1)[rows]
    hosts, which = torch.unique(into, return_inverse=True)
    return rows, flat[rows], which, hosts


def _fold_rows(v: Tensor, host_w: Tensor, moved: tuple[Tensor, Tensor, Tensor, Tensor],
               normalise: bool = False) -> Tensor:
    """What ``torch.where(got, _fold_into(v, host_w, v, wr, dest), v)`` gives (then made unit-norm on the
    hosts with ``normalise``), computed on the rows that move and the rows that receive only: a padded
    dynamic batch removes a few tokens per image, and the dense form reads and writes every row."""
    rows, w, which, hosts = moved
    b, n, c = v.shape
    flat = v.reshape(b * n, c)
    hw = host_w.to(v.dtype).reshape(-1)[hosts] if isinstance(host_w, Tensor) else \
        torch.full((len(hosts),), float(host_w), dtype=v.dtype, device=v.device)
    num = (flat[hosts] * hw.unsqueeze(-1)).index_add_(0, which, flat[rows] * w.to(v.dtype).unsqueeze(-1))
    folded = num / hw.index_add(0, which, w.to(v.dtype)).unsqueeze(-1)
    out = flat.clone()
    out[hosts] = unit_norm(folded) if normalise else folded
    return out.view(b, n, c)


def unit_norm(v: Tensor) -> Tensor:
    """``v`` scaled to unit length along its last dimension (a zero vector stays near zero)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _tps_features(x: Tensor) -> Tensor:
    """TPS's similarity features: the tokens themselves, detached, in fp32, made unit-norm."""
    f = x.detach().float()
    return f / (f.norm(dim=-1, keepdim=True) + 1e-6)


def _fuse(t: Tokens, remove: Tensor, dest: Tensor, weight: Tensor, host_weight: Tensor, code: int,
          grow: bool = True) -> Tokens:
    """Remove tokens with weights ``remove`` and fold them into ``dest``.

    The host ``j`` becomes ``(hw_j x_j + sum_i r_i w_i x_i) / (hw_j + sum_i r_i w_i)`` over the
    tokens ``i`` with ``dest[i] = j``; with ``grow`` its size grows by ``sum_i r_i size_i``. Tokens
    that receive nothing are left bit-for-bit unchanged.
    """
    wr = remove * weight
    if _by_rows(wr, t.x, t.metric):
        moved = _moved_rows(wr, dest)
        x = _fold_rows(t.x, host_weight, moved)
        metric = _fold_rows(t.metric, host_weight, moved, normalise=True) if t.needs_metric else t.metric
    else:
        got = (torch.zeros_like(wr).scatter_add_(1, dest, wr) > 0).unsqueeze(-1)

        def fold(v: Tensor) -> Tensor:
            return torch.where(got, _fold_into(v, host_weight, v, wr, dest), v)

        x = fold(t.x)
        metric = t.metric
        if t.needs_metric:
            metric = fold(metric)
            metric = torch.where(got, unit_norm(metric), metric)
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


# -- static mode's fast forms: every image keeps the same number of tokens -----------------------------


@dataclass
class Compact:
    """A static-mode token sequence: the same number of live tokens in every image, in sequence order.

    The per-token tensors keep the block's full length ``N``; ``index`` lists, per image, the
    positions of the live tokens in sequence order (prefix first), ``None`` while all ``N`` are live.
    A stage gathers what it reads, writes the tokens it fuses over the old ones (in place when
    ``inplace``, else into copies) and narrows ``index``; the block gathers the features once at its end (:meth:`gathered`), so a block
    that merges and then prunes moves its features once.

    Attributes:
        x: Token features, ``[B, N, C]``.
        index: Positions of the live tokens, ``[B, M]``, or ``None`` (all live).
        size: Patches each token stands for, ``[B, N]``, or ``None`` while every token is one patch.
        keys: The attention keys of the block, ``[B, H, N, d]`` (the similarity metric is their mean
            over heads, made unit-norm on first use: :meth:`unit_metric`).
        importance: Importance scores, ``[B, N]`` (prefix entries are ignored), or ``None``.
        num_prefix, merge_order, squeeze_host, needs_metric, needs_importance: as in :class:`Tokens`.
        inplace: The per-token tensors belong to this block alone and no gradient flows: stages may
            write their fused tokens over the old ones in place instead of copying the whole sequence.
        positional: The block must know where every live token came from (rotary or relative
            positions read ``index``), so a stage may not start the sequence afresh.
    """

    x: Tensor
    index: Tensor | None
    size: Tensor | None
    keys: Tensor | None
    importance: Tensor | None
    num_prefix: int
    merge_order: str = "keep"
    squeeze_host: str = "keys"
    needs_metric: bool = True
    needs_importance: bool = True
    metric: Tensor | None = None
    inplace: bool = False
    positional: bool = False

    @property
    def length(self) -> int:
        """Live tokens per image."""
        return self.x.shape[1] if self.index is None else self.index.shape[1]

    def unit_metric(self) -> Tensor:
        """Unit-norm similarity features, ``[B, N, d]`` (computed from the keys once)."""
        if self.metric is None:
            if self.keys is None:
                raise ValueError("merge and squeeze need the attention keys")
            self.metric = unit_norm(head_mean(self.keys))
        return self.metric

    def live(self, v: Tensor) -> Tensor:
        """The live tokens' rows of a full-length ``v``."""
        return v if self.index is None else _gather_rows(v, self.index)

    def positions(self, local: Tensor) -> Tensor:
        """Full-length positions of live tokens given by their place among the live ones."""
        return local if self.index is None else self.index.gather(1, local)

    def sizes(self) -> Tensor:
        """``size``, or ones while every token is one patch."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[:2], dtype=torch.float32)

    def gathered(self) -> tuple[Tensor, Tensor | None]:
        """The live tokens' features and sizes, in sequence order."""
        size = None if self.size is None else self.live(self.size)
        return self.live(self.x), size


def _gather_rows(v: Tensor, idx: Tensor) -> Tensor:
    """``v[b, idx[b, i]]`` for ``v`` of shape ``[B, N]`` or ``[B, N, C]``."""
    if v.dim() == 2:
        return v.gather(1, idx)
    return v.gather(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))


def _put_rows(v: Tensor, idx: Tensor, rows: Tensor, inplace: bool) -> Tensor:
    """``v`` with ``v[b, idx[b, i]] = rows[b, i]``: written into ``v`` itself, or into a copy."""
    if v.dim() == 3:
        idx = idx.unsqueeze(-1).expand(-1, -1, v.shape[-1])
    return v.scatter_(1, idx, rows) if inplace else v.scatter(1, idx, rows)


def head_mean(keys: Tensor) -> Tensor:
    """The similarity features of ToMe and LTMP: attention keys ``[B, H, N, d]`` averaged over heads.

    Reduced over the heads of a ``[B, N, H, d]`` view: in the layout of timm's fused ``qkv`` output
    the heads of one token lie next to each other, so this reads memory in order.
    """
    return keys.transpose(1, 2).mean(dim=2)


def _fuse_static(t: Compact, host: Tensor, moved: Tensor, dest: Tensor, host_w: Tensor, moved_w: Tensor,
                 size: Tensor | None, **replaced: Any) -> Compact:
    """Fold the tokens at full positions ``moved`` into those at ``host`` (``dest``: which host, by
    its place in ``host``): features, metric (if a later stage reads it), importance (the most
    important absorbed, LTMP) and, given, the hosts' new ``size``."""
    x = _put_rows(t.x, host, _fold_into(_gather_rows(t.x, host), host_w, _gather_rows(t.x, moved), moved_w, dest),
                  t.inplace)
    metric = None
    if t.needs_metric:
        m = t.unit_metric()
        metric = _put_rows(m, host, unit_norm(_fold_into(_gather_rows(m, host), host_w, _gather_rows(m, moved),
                                                     moved_w, dest)), t.inplace)
    importance = t.importance
    if t.needs_importance and importance is not None:
        reduce = importance.scatter_reduce_ if t.inplace else importance.scatter_reduce
        importance = reduce(1, host.gather(1, dest), importance.gather(1, moved), reduce="amax", include_self=True)
    if size is not None:
        size = _put_rows(t.sizes(), host, size, t.inplace)
    return replace(t, x=x, size=size if size is not None else t.size, metric=metric, importance=importance,
                   **replaced)


def _static_merge(t: Compact, r: int) -> Compact:
    """:func:`merge` on a compact sequence: the ``r`` best-matched sources join their destinations."""
    if r <= 0:
        return t
    if (t.index is None and t.merge_order == "tome" and not t.positional and not t.needs_metric
            and not (t.needs_importance and t.importance is not None)):
        return _merge_afresh(t, r)
    p, n = t.num_prefix, t.length
    # Sources: odd patch ranks ("keep"), or even positions of the whole sequence ("tome", ToMe's split).
    first_src = p + 1 if t.merge_order == "keep" or p % 2 == 1 else p
    first_dst = p + (first_src == p)
    src, dst = slice(first_src, n, 2), slice(first_dst, n, 2)
    metric = t.live(t.unit_metric().detach())
    best, dest = (metric[:, src] @ metric[:, dst].transpose(1, 2)).float().max(dim=-1)
    ranked = best.argsort(dim=1, descending=True, stable=True)
    merged, kept = ranked[:, :r], ranked[:, r:]
    b = best.shape[0]
    local = torch.arange(n, device=best.device)
    src_local, dst_local = local[src].expand(b, -1), local[dst].expand(b, -1)
    host, moved = t.positions(dst_local), t.positions(src_local.gather(1, merged))
    into = dest.gather(1, merged)
    size = t.sizes()
    s_host, s_moved = size.gather(1, host), size.gather(1, moved)
    if t.merge_order == "tome":  # prefix, unmerged sources, destinations (ToMe's cat([unm, dst]))
        # ToMe puts the unmerged sources back in sequence order only when there is a class token; without
        # one they stay in its edge order, best-matched first.
        unmerged = kept.sort(dim=1).values if p else kept
        order = torch.cat([local[:p].expand(b, -1), src_local.gather(1, unmerged), dst_local], dim=1)
    else:  # sequence order: the unmerged sources stay between the destinations
        stay = torch.ones(b, n, dtype=torch.uint8, device=best.device).scatter(1, first_src + 2 * merged, 0)
        order = stay.argsort(dim=1, descending=True, stable=True)[:, :n - r]
    return _fuse_static(t, host, moved, into, s_host, s_moved, s_host.scatter_add(1, into, s_moved),
                        index=t.positions(order))


def _merge_afresh(t: Compact, r: int) -> Compact:
    """:func:`_static_merge` in ToMe's order as a block's last stage on an untouched sequence: the two
    halves are strided views and the new sequence is built in one concatenation (prefix, unmerged
    sources, destinations), with no positions to carry. Same tokens, same values as the general form."""
    p, n = t.num_prefix, t.length
    first_src = p + 1 if p % 2 == 1 else p
    src, dst = slice(first_src, n, 2), slice(p + (first_src == p), n, 2)
    metric = t.unit_metric().detach()
    best, dest = (metric[:, src] @ metric[:, dst].transpose(1, 2)).float().max(dim=-1)
    ranked = best.argsort(dim=1, descending=True, stable=True)
    merged, kept = ranked[:, :r], ranked[:, r:]
    unmerged = kept.sort(dim=1).values if p else kept
    into = dest.gather(1, merged)
    size = t.sizes()
    x_src, s_src, s_dst = t.x[:, src], size[:, src], size[:, dst]
    s_moved = s_src.gather(1, merged)
    x_dst = _fold_into(t.x[:, dst], s_dst, _gather_rows(x_src, merged), s_moved, into)
    x = torch.cat([t.x[:, :p], _gather_rows(x_src, unmerged), x_dst], dim=1)
    size = torch.cat([size[:, :p], s_src.gather(1, unmerged), s_dst.scatter_add(1, into, s_moved)], dim=1)
    return replace(t, x=x, index=None, size=size, keys=None, metric=None)


def _merge_pairs(n: int, r: int) -> int:
    """Pairs :func:`_static_merge` compares: every source with every destination, the two halves of
    the ``n`` live patch tokens (whichever parity the split takes, one half has ``n // 2``)."""
    return (n // 2) * (n - n // 2) if r > 0 else 0


def _static_prune_split(t: Compact, r: int) -> tuple[Tensor, Tensor]:
    """Places among the live tokens of the kept patch tokens (in sequence order) and of the ``r``
    least important ones."""
    if t.importance is None:
        raise ValueError("prune and squeeze need importance scores")
    p = t.num_prefix
    ranked = t.live(t.importance)[:, p:].argsort(dim=1, descending=True) + p
    keep = ranked.shape[1] - r
    return ranked[:, :keep].sort(dim=1).values, ranked[:, keep:]


def _with_prefix(t: Compact, kept: Tensor) -> Tensor:
    """The new ``index``: the prefix, then the kept patch tokens (places among the live ones)."""
    pre = torch.arange(t.num_prefix, device=kept.device).expand(kept.shape[0], -1)
    return t.positions(torch.cat([pre, kept], dim=1))


def _static_prune(t: Compact, r: int) -> Compact:
    """:func:`prune` on a compact sequence: the ``r`` least important patch tokens go."""
    if r <= 0:
        return t
    kept, _ = _static_prune_split(t, r)
    return replace(t, index=_with_prefix(t, kept))


def _static_squeeze(t: Compact, r: int) -> Compact:
    """:func:`squeeze` on a compact sequence: the ``r`` least important patch tokens join their hosts."""
    if r <= 0:
        return t
    kept, pruned = _static_prune_split(t, r)
    host, moved = t.positions(kept), t.positions(pruned)
    size = t.sizes()
    s_host, s_moved = size.gather(1, host), size.gather(1, moved)
    if t.squeeze_host == "tps":
        f_host, f_moved = (_tps_features(_gather_rows(t.x, i)) for i in (host, moved))
        best, dest = (f_moved @ f_host.transpose(1, 2)).max(dim=-1)
        w, hw, new_size = torch.exp(best), torch.full_like(s_host, math.e), None
    else:
        metric = t.unit_metric().detach()
        best, dest = (_gather_rows(metric, moved) @ _gather_rows(metric, host).transpose(1, 2)).float().max(dim=-1)
        w, hw = torch.exp(best) * s_moved, math.e * s_host
        new_size = s_host.scatter_add(1, dest, s_moved)
    return _fuse_static(t, host, moved, dest, hw, w, new_size, index=_with_prefix(t, kept))


def _squeeze_pairs(n: int, r: int) -> int:
    """Pairs :func:`_static_squeeze` compares: each of the ``r`` pruned tokens with the ``n - r`` kept ones."""
    return r * (n - r) if r > 0 else 0


@register_reducer("merge", threshold="merge_threshold", needs_importance=False, similarities=1,
                  static=_static_merge, static_pairs=_merge_pairs)
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
        first = base
        if t.num_prefix == 0:
            # Without a class token ToMe leaves the unmerged sources in its edge order (best match
            # first, ties by sequence order) rather than in sequence order.
            first = torch.where(src, _edge_rank(best.detach().masked_fill(~src, float("-inf")), t.rank()), base)
        top = torch.maximum(base.amax(dim=1, keepdim=True), torch.full_like(base[:, :1], n))
        out.order = torch.where(dst, base + top + 1, first)
    return out


def _edge_rank(score: Tensor, rank: Tensor) -> Tensor:
    """Place of every token when sorted by ``score``, highest first, ties by ``rank`` (sequence order)."""
    in_sequence = rank.argsort(dim=1, stable=True)
    by_score = score.gather(1, in_sequence).argsort(dim=1, descending=True, stable=True)
    positions = in_sequence.gather(1, by_score)
    places = torch.arange(score.shape[1], device=score.device).expand_as(positions)
    return torch.empty_like(positions).scatter_(1, positions, places)


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
                  static=_static_squeeze, static_pairs=_squeeze_pairs)
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
        best, dest = _similarity(_tps_features(t.x), hosts)
        weight = torch.exp(best)  # exp(-inf) = 0: with no host a token is simply pruned
        return _fuse(t, remove, dest, weight, torch.full_like(t.size, math.e), SQUEEZED, grow=False)
    best, dest = _similarity(t.metric, hosts)
    weight = torch.exp(best) * t.size
    return _fuse(t, remove, dest, weight, math.e * t.size, SQUEEZED)
