"""LTMP's soft (training) forward as released: the ``ltmp`` soft form of merge and prune.

The project's own soft mode (the soft form ``project``, :mod:`ltmp_core.reducers`) trains the
thresholds of the model it deploys: the bipartite split alternates over the live tokens, a merge
or prune composes with the masks before it, a fused token carries the straight-through factor of
its merge, the most important patch is never pruned and the scores carry no gradient. LTMP's
released training block (``LTMPBlock.forward`` in ``lt_mergeprune.py`` of its repository, with its
``softmax_with_mask`` and ``ThresholdMasker``) does otherwise, and its thresholds learn from other
gradients. This module is that block, on the project's :class:`~ltmp_core.reducers.Tokens`:

- The split alternates over the whole sequence, removed tokens included, in sequence order; a
  removed token's similarity features are zeroed (it matches with similarity 0). After the merge
  the sequence is every source, then every destination (``cat([src, dst])``); a merged source stays
  where it is, masked.
- A destination becomes the size-weighted sum of itself and its merged sources, the merge masks
  *detached*; its size grows by theirs, likewise. Its importance becomes the largest of its own and
  its merged sources'.
- Masks are overwritten, not composed: a live source's mask becomes ``1 - merge mask``, a removed
  one keeps its own; then every token still live gets its prune mask as its mask. A mask therefore
  carries the gradient of one threshold, the one that last decided about it.
- The prune may remove any patch token, the most important one too; only prefix tokens (importance
  ``+inf``) stay.
- Scores are not detached: similarities and importances pass the gradients of later masks back
  into the features, and so to earlier thresholds. (The attention half, with LTMP's epsilon
  softmax and its importance over all queries, is :func:`ltmp_core.attention.attend` with
  ``released=True``.)

Tokens keep their positions, as in the project's soft mode: the sequence order is
``Tokens.order`` (``None``: the positions). With one prefix token, the class token, this computes
LTMP's block; other prefix tokens (distillation, registers) are protected the way the class token
is, as sources, as destinations and from pruning (the release protects position 0 only, so on a
model without a class token it would protect the first patch).

Each function takes ``mask(score) -> keep weights``: LTMP's straight-through threshold mask, 1 where
the score clears the threshold (:func:`ltmp_core.masking.threshold_mask`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from .reducers import Tokens, _gather_rows

__all__ = ["RELEASED", "released_merge", "released_prune", "sequence"]

Mask = Callable[[Tensor], Tensor]


def sequence(t: Tokens) -> Tensor:
    """Positions of all tokens, live or not, in sequence order, ``[B, N]``."""
    b, n = t.alive.shape
    if t.order is None:
        return torch.arange(n, device=t.alive.device).expand(b, n)
    return t.order.argsort(dim=1, stable=True)


def released_merge(t: Tokens, mask: Mask) -> Tokens:
    """LTMP's training merge: sources are the tokens at even places of the whole sequence.

    ``mask(similarity)`` is the merge mask of every source (1: merged into its best destination).
    """
    b, n, c = t.x.shape
    p = t.num_prefix
    seq = sequence(t)
    src, dst = seq[:, 0::2], seq[:, 1::2]
    metric = t.metric * t.alive.detach().unsqueeze(-1).to(t.metric.dtype)
    sim = (_gather_rows(metric, src) @ _gather_rows(metric, dst).transpose(1, 2)).float()
    sim = sim.masked_fill((src < p).unsqueeze(2), -math.inf).masked_fill((dst < p).unsqueeze(1), -math.inf)
    best, into = sim.max(dim=-1)
    merged = mask(best)
    src_alive = t.alive.gather(1, src)
    unmerged = torch.where(src_alive.detach() != 0, 1 - merged, src_alive)
    w = merged.detach()
    host = dst.gather(1, into)  # position of each source's destination
    weighted = t.x * t.size.unsqueeze(-1).to(t.x.dtype)
    moved = _gather_rows(weighted, src) * w.unsqueeze(-1).to(t.x.dtype)
    weighted = weighted.scatter_add(1, host.unsqueeze(-1).expand(-1, -1, c), moved)
    size = t.size.scatter_add(1, host, t.size.gather(1, src) * w)
    importance = t.importance
    if importance is not None:
        gone = (importance.gather(1, src) * w).masked_fill(src < p, 0.0)
        importance = importance.scatter_reduce(1, host, gone, reduce="amax", include_self=True)
    places = torch.arange(n, device=seq.device).expand(b, n)
    order = torch.empty_like(seq).scatter_(1, torch.cat([src, dst], dim=1), places)
    return replace(t, x=weighted / size.unsqueeze(-1).to(t.x.dtype), size=size,
                   alive=t.alive.scatter(1, src, unmerged), importance=importance, order=order)


def released_prune(t: Tokens, mask: Mask) -> Tokens:
    """LTMP's training prune: every live token's mask becomes ``mask(importance)`` (1: kept)."""
    if t.importance is None:
        raise ValueError("prune needs importance scores")
    keep = mask(t.importance)
    return replace(t, alive=torch.where(t.alive.detach() != 0, keep.to(t.alive.dtype), t.alive))


#: Stage name -> its released training form (the stages LTMP has).
RELEASED: dict[str, Callable[[Tokens, Mask], Tokens]] = {"merge": released_merge, "prune": released_prune}
