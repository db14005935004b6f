"""LTMP's learned threshold masks and the masked softmax that makes a masked token count as gone."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["threshold_mask", "masked_softmax", "released_softmax", "threshold_between", "score_spread"]

#: The epsilon of LTMP's training softmax (:func:`released_softmax`).
RELEASED_EPS = 1e-5


def threshold_mask(score: Tensor, threshold: Tensor | float, tau: float) -> Tensor:
    """LTMP's straight-through threshold mask: 1 where ``score`` clears the threshold.

    The forward value is the hard step ``score > threshold``; the gradient is that of the soft mask
    ``sigmoid((score - threshold) / tau)``. So the thresholds learn while the forward pass behaves
    exactly like the deployed model.
    """
    soft = torch.sigmoid((score - threshold) / tau)
    hard = (score > threshold).to(soft.dtype)
    return hard + (soft - soft.detach())


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` in which entry ``j`` is weighted by ``mask[..., j]``.

    ``exp(a_j) m_j / sum_k exp(a_k) m_k``: with a 0/1 mask this is the softmax over the kept entries
    alone (as if the others were gone), and it stays differentiable in ``mask``. ``mask`` must
    broadcast against ``logits`` and keep at least one entry of every row.
    """
    keep = mask.detach() > 0
    shift = logits.masked_fill(~keep, float("-inf")).amax(dim=dim, keepdim=True).detach()
    e = torch.exp(logits - shift) * mask
    return e / e.sum(dim=dim, keepdim=True)


def released_softmax(logits: Tensor, mask: Tensor, eps: float = RELEASED_EPS) -> Tensor:
    """LTMP's masked softmax of its training forward, as released (``softmax_with_mask``, training).

    ``(exp(a_j - max_k a_k) m_j + eps / N) / (sum_k exp(a_k - max_k a_k) m_k + eps)`` over the last
    dimension of length ``N``: the shift is the maximum over every entry, masked ones included, and
    not detached, and every entry, a masked one too, keeps a weight of about ``eps / N``. ``mask``
    broadcasts against ``logits``. :func:`masked_softmax` is the exact form of the same idea.
    """
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True)) * mask
    return (e + eps / logits.shape[-1]) / (e.sum(dim=-1, keepdim=True) + eps)


def threshold_between(
    score: Tensor, eligible: Tensor, remove: float, weight: Tensor | None = None
) -> tuple[float, float]:
    """A threshold that removes the highest eligible scores, pooled over the batch, and its scale.

    Without ``weight``, exactly ``remove`` tokens go. With a per-token ``weight`` (``[B, N]``), the
    highest scores go until their summed weight is as close as possible to ``remove``; weighting the
    tokens of image ``b`` by ``1 / n_b`` targets the batch-mean *fraction* removed instead of the
    pooled count. The threshold is the midpoint between the last removed and the first kept score,
    so that the hard rule ``score > threshold`` selects exactly those tokens (barring ties).

    Returns:
        ``(threshold, scale)``: ``scale`` is the score gap spanned by the 10% of eligible tokens on
        either side of the cut, i.e. how far the threshold must move to change the cut noticeably.
    """
    values = score.detach()[eligible].double()
    n = values.numel()
    if n == 0:
        return 0.0, 1.0
    values, order = values.sort(descending=True)
    if weight is None:
        k = int(round(remove))
    else:
        cum = weight.detach()[eligible].double()[order].cumsum(0)
        cum = torch.cat([cum.new_zeros(1), cum])
        k = int((cum - remove).abs().argmin())
    scale = _spread(values, k)
    if k <= 0:
        return float(values[0]) + 1e-4 * scale, scale
    if k >= n:
        return float(values[-1]) - 1e-4 * scale, scale
    return 0.5 * float(values[k - 1] + values[k]), scale


def _spread(values: Tensor, k: int) -> float:
    """The gap spanned by the 10% of ``values`` (sorted, descending) on either side of position ``k``."""
    n = values.numel()
    w = max(1, n // 10)
    return max(float(values[max(0, k - w)] - values[min(n - 1, k + w)]), 1e-6)


def score_spread(score: Tensor, eligible: Tensor, threshold: float) -> float:
    """The scale of :func:`threshold_between` for a cut at a given ``threshold`` (``score > threshold``)."""
    values = score.detach()[eligible].double()
    if values.numel() == 0:
        return 1.0
    values = values.sort(descending=True).values
    return _spread(values, int((values > threshold).sum()))
