"""timm's attention with what token reduction needs: token sizes, token masks and importance scores.

Pure functions of a timm ``Attention`` module and tensors. The patched block
(:mod:`ltmp_core.patch`) calls :func:`attend` in place of ``Attention.forward``; everything else of
the attention (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``) is timm's own
module, so LayerScale, qk-norm and scale-norm variants keep working.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .masking import masked_softmax, released_softmax

__all__ = ["attend", "importance_scores", "length_groups", "packed", "project_qkv"]

Packing = Tensor  # flat indices of the live rows of a padded batch


def importance_scores(attn: Tensor, alive: Tensor | None, num_prefix: int, raw: bool = False) -> Tensor:
    """Attention each token receives, relative to a uniform share; ``+inf`` on prefix tokens.

    LTMP's importance is the mean attention a token receives (over heads and live queries). Those
    means sum to one over the live tokens, so their scale is ``1 / n``: an image that already lost
    tokens would look more important everywhere. Multiplying by the live count ``n`` keeps the order
    within an image (the same tokens are pruned for a given count) and makes one threshold mean the
    same in every image and layer: a score of 1 is an average token. ``attn`` is ``[B, H, Nq, Nk]``
    (every query: mean importance) or ``[B, H, 1, Nk]`` (the class query: class importance).
    With ``raw`` the scores are LTMP's own, the mean attention itself (about ``1 / n``).
    """
    attn = attn.detach()
    heads, queries = attn.shape[1], attn.shape[2]
    n = attn.shape[-1] if alive is None else (alive.detach() > 0.5).sum(dim=1, keepdim=True).float()
    if queries == 1:  # the class token's attention: one row, already over live keys only
        imp = attn[:, :, 0].float().mean(dim=1) * n
    elif alive is None:
        imp = attn.float().sum(dim=(1, 2)) / heads  # mean over queries times n: a plain sum
    else:
        w = (alive.detach() > 0.5).to(attn.dtype)
        imp = torch.einsum("bhqk,bq->bk", attn, w).float() / heads
    if raw:
        imp = imp / n
    return imp.index_fill(1, torch.arange(num_prefix, device=imp.device), math.inf)


def attend(
    attn: nn.Module,
    x: Tensor,
    *,
    size: Tensor | None,
    alive: Tensor | None,
    soft: bool,
    packing: Packing | None,
    importance: str | None,
    lengths: list[int] | None = None,
    num_prefix: int,
    raw: bool = False,
    rope: Tensor | None = None,
    pos_bias: Tensor | None = None,
    released: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """timm's ``Attention.forward`` with proportional attention and token masks.

    Args:
        attn: The attention module of the block: timm's ``Attention``, ``AttentionRope``, Eva's
            ``EvaAttention``, BEiT's or ``RelPosAttention`` (:func:`project_qkv` reads each one's
            projections).
        x: Normalised tokens, ``[B, N, C]``.
        size: Patches each token stands for (``+ log size`` on the logits), or ``None`` while all are 1.
        alive: 1 for live tokens, 0 for removed or padding ones, ``[B, N]``; ``None`` when all are live.
        soft: Soft (training) mode: ``alive`` may carry straight-through gradients; dead keys are
            weighted out of the softmax (:func:`~ltmp_core.masking.masked_softmax`), not set to -inf.
        packing: For a padded batch, the live rows: token-wise layers run on live rows only.
        lengths: For a padded batch whose live tokens come first in every row, each image's live count:
            the fused attention runs on groups of images of similar length, each cut to its longest
            image (:func:`length_groups`), instead of over the whole batch's padding.
        importance: ``None`` (no stage needs scores), ``mean`` (the full attention map) or ``cls`` (the
            class query's row alone, so the attention itself stays fused).
        num_prefix: Leading class, distillation and register tokens (their importance is ``+inf``).
        raw: LTMP's raw importance units (see :func:`importance_scores`).
        rope: Rotary embeddings of the patch tokens as they lie now (each token's own row), ready for
            timm's ``apply_rot_embed_cat``; applied to queries and keys after their norms, prefix tokens
            untouched (as ``EvaAttention`` does). ``None``: no rotary embedding.
        pos_bias: Relative position bias of the tokens as they lie now, ``[B or 1, H, N, N]``, added to
            the logits (BEiT, ``VisionTransformerRelPos``). ``None``: none.
        released: LTMP's training attention as released (soft form ``ltmp``): its softmax with an
            epsilon (:func:`~ltmp_core.masking.released_softmax`, also before any token is masked),
            and as importance its mean attention over heads and *all* queries, masked ones included,
            in raw units and not detached (``importance`` is then only asked whether to compute it).

    Returns:
        The attention output, the keys ``[B, H, N, d]`` and the importance scores (or ``None``).
    """
    b, n, _ = x.shape
    h, d = attn.num_heads, head_width(attn)
    q, k, v = project_qkv(attn, x, packing)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # BEiT has none
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if rope is not None:
        q, k = _rotate(q, v, rope, attn), _rotate(k, v, rope, attn)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention (AttentionRope): every query head reads its group's keys
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    if pos_bias is not None:
        pos_bias = pos_bias.to(q.dtype)
        bias = pos_bias if bias is None else pos_bias + bias
    soft = soft and alive is not None

    def normalise(logits: Tensor) -> Tensor:
        if bias is not None:
            logits = logits + bias
        if alive is None:
            return logits.softmax(dim=-1)
        if soft:
            return masked_softmax(logits, alive[:, None, None, :].to(logits.dtype))
        return logits.masked_fill(alive[:, None, None, :] <= 0.5, float("-inf")).softmax(dim=-1)

    scores = None
    if released:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        keep = torch.ones(b, n, device=x.device) if alive is None else alive
        probs = released_softmax(logits, keep[:, None, None, :].to(logits.dtype))
        if importance is not None:
            prefix = torch.arange(num_prefix, device=x.device)
            scores = probs.float().mean(dim=(1, 2)).index_fill(1, prefix, math.inf)
        out = attn.attn_drop(probs) @ v
    elif importance == "mean" or soft or not attn.fused_attn:
        probs = normalise((q * attn.scale) @ k.transpose(-2, -1))
        if importance is not None:
            scores = importance_scores(probs[:, :, :1] if importance == "cls" else probs, alive, num_prefix, raw)
        out = attn.attn_drop(probs) @ v
    else:
        if importance == "cls":
            # One query: a product and a sum over the keys as they lie (a matmul would copy them first).
            row = normalise((k * (q[:, :, :1] * attn.scale)).sum(dim=-1).unsqueeze(2))
            scores = importance_scores(row, alive, num_prefix, raw)
        dropout = attn.attn_drop.p if attn.training else 0.0
        groups = None
        if lengths is not None and alive is not None:
            # On the CPU a call costs little beside its work: every image alone, through views. On an
            # accelerator a launch costs more than a little padding: images of similar length together.
            groups = (length_groups(lengths, slack=None) if q.device.type == "cpu"
                      else length_groups(lengths, GROUP_SLACK, max_groups=MAX_GROUPS))
        if groups is not None and len(groups) > 1:
            out = _grouped_attention(q, k, v, bias, alive, lengths, groups, dropout)
        else:
            mask = bias if alive is None else _with_padding(bias, alive, q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(b, n, h * d)
    if packing is not None and getattr(attn, "gate", None) is None:
        return packed(lambda o: _attn_out(attn, o, None), out, packing), k, scores
    return _attn_out(attn, out, x), k, scores


#: A group of images may carry this much more attention work than its images alone (padding to its longest).
GROUP_SLACK = 0.1
#: At most this many groups per attention on an accelerator (each is a few kernel launches).
MAX_GROUPS = 8


def length_groups(lengths: list[int], slack: float | None = GROUP_SLACK,
                  max_groups: int | None = None) -> list[tuple[list[int], int]]:
    """Images of a padded batch in groups of similar length, longest first: ``(images, length)`` pairs.

    An image joins the group of the images just longer than it while the group's attention, every image
    padded to the group's longest (``size * length ** 2`` query-key pairs), stays within ``1 + slack`` of
    what its images need alone; else it starts a group. Equal lengths always share a group. With
    ``max_groups``, the slack doubles until the groups are that few. ``slack=None``: every image is a group
    of its own (in the batch's order).
    """
    if slack is None:
        return [([i], n) for i, n in enumerate(lengths)]
    groups = _greedy_groups(lengths, slack)
    while max_groups is not None and len(groups) > max_groups:
        slack *= 2
        groups = _greedy_groups(lengths, slack)
    return groups


def _greedy_groups(lengths: list[int], slack: float) -> list[tuple[list[int], int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[tuple[list[int], int]] = []
    members: list[int] = []
    need = 0
    for i in order:
        n = lengths[i]
        if members and (len(members) + 1) * longest ** 2 > (1 + slack) * (need + n * n):
            groups.append((members, longest))
            members, need = [], 0
        if not members:
            longest = n
        members.append(i)
        need += n * n
    if members:
        groups.append((members, longest))
    return groups


def _grouped_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alive: Tensor, lengths: list[int],
                       groups: list[tuple[list[int], int]], dropout: float) -> Tensor:
    """Fused attention of a padded batch (live tokens first in every row), one call per group of images
    cut to the group's longest image; the padding rows of the output are zero (they are dropped)."""
    out = q.new_zeros(q.shape[:3] + (v.shape[-1],))
    for members, n in groups:
        rows: Tensor | slice
        if len(members) == 1:
            rows = slice(members[0], members[0] + 1)  # views: nothing copied
        else:
            rows = torch.tensor(members, device=q.device)
        qg, kg, vg = (t[:, :, :n][rows] for t in (q, k, v))
        mask = None
        if bias is not None:  # [B or 1, 1 or H, 1 or N, N]
            b = bias[:, :, :n, :n] if bias.shape[2] > 1 else bias[:, :, :, :n]
            mask = b if b.shape[0] == 1 else b[rows]
        if any(lengths[i] < n for i in members):
            mask = _with_padding(mask, alive[:, :n][rows], q.dtype)
        done = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout)
        if isinstance(rows, slice):
            out[rows, :, :n] = done
        else:
            out[:, :, :n].index_copy_(0, rows, done)
    return out


def _with_padding(mask: Tensor | None, alive: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive attention mask with ``-inf`` on the keys ``alive`` marks dead or padding (``[B, N]``)."""
    pad = torch.zeros_like(alive, dtype=dtype).masked_fill(alive <= 0.5, float("-inf"))[:, None, None, :]
    return pad if mask is None else mask + pad


def head_width(attn: nn.Module) -> int:
    """Width of one head: ``head_dim``, or (BEiT's attention, which does not keep it) the projection's
    input width over the heads."""
    return getattr(attn, "head_dim", None) or attn.proj.in_features // attn.num_heads


def project_qkv(attn: nn.Module, x: Tensor, packing: Packing | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values ``[B, heads, N, head_dim]`` through the attention's own projections.

    A fused ``qkv`` linear (timm's ``Attention``, ``RelPosAttention``), the same with separate query and
    value biases and none on the keys (``EvaAttention``, BEiT's ``Attention``: ``q_bias``, ``v_bias``,
    added inside the linear or after it as ``qkv_bias_separate`` says), or three linears
    (``q_proj``, ``k_proj``, ``v_proj``; keys and values with ``num_kv_heads`` heads). In a padded batch
    (``packing``) the linears run on the live rows only.
    """
    b, n, _ = x.shape
    h, d = attn.num_heads, head_width(attn)

    def linear(fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x) if packing is None else packed(fn, x, packing)

    qkv = getattr(attn, "qkv", None)
    if qkv is None:
        kv_heads = getattr(attn, "num_kv_heads", None) or h
        q = linear(attn.q_proj).reshape(b, n, h, d).transpose(1, 2)
        k = linear(attn.k_proj).reshape(b, n, kv_heads, d).transpose(1, 2)
        v = linear(attn.v_proj).reshape(b, n, kv_heads, d).transpose(1, 2)
        return q, k, v
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        fn = qkv
    else:
        k_bias = getattr(attn, "k_bias", None)
        joint = torch.cat((q_bias, torch.zeros_like(q_bias) if k_bias is None else k_bias, attn.v_bias))
        if getattr(attn, "qkv_bias_separate", False):
            fn = lambda t: qkv(t) + joint  # noqa: E731
        else:
            fn = lambda t: F.linear(t, qkv.weight, joint)  # noqa: E731
    q, k, v = linear(fn).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _rotate(t: Tensor, like: Tensor, rope: Tensor, attn: nn.Module) -> Tensor:
    """timm's rotary embedding on the patch tokens of queries or keys ``t``; prefix tokens as they are."""
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


def _attn_out(attn: nn.Module, out: Tensor, x: Tensor | None) -> Tensor:
    """timm's tail of the attention: scale-norm, optional gate, projection."""
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def packed(fn: Callable[[Tensor], Tensor], t: Tensor, packing: Packing) -> Tensor:
    """A token-wise ``fn`` on the live tokens of a padded batch only; padding rows come back zero."""
    b, n, c = t.shape
    done = fn(t.reshape(b * n, c).index_select(0, packing))
    # Zeros, then the live rows: a memset costs less than filling the scattered padding rows.
    return done.new_zeros(b * n, done.shape[-1]).index_copy_(0, packing, done).view(b, n, -1)
