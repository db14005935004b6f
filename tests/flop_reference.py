"""The independent FLOP reference of the tests and benchmarks: PyTorch's counter, made release-proof.

``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs per ATen op from a table of formulas. Which
ops the table covers depends on the torch release: torch 2.14 has no formula for
``aten._scaled_dot_product_flash_attention_for_cpu``, the op that ``F.scaled_dot_product_attention``
runs on the CPU, and silently counts 0 for the attention of every fused timm block. The reference
here hands the counter the textbook formula for every SDPA forward op of the running torch
(``q @ k^T`` and ``attn @ v``: ``B * H * Nq * Nk * (d + dv)`` MACs), so the figure no longer depends
on the release; ``tests/ltmp_core/test_flop_reference.py`` guards it against a hand-computed block.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["SDPA_OPS", "counted_macs", "versions"]

#: Forward SDPA kernels whose first three arguments are query, key, value ([B, H, N, d]).
_SDPA_NAMES = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
SDPA_OPS = [getattr(torch.ops.aten, name) for name in _SDPA_NAMES if hasattr(torch.ops.aten, name)]


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of ``softmax(q k^T) v`` from the shapes of q, k and v."""
    b, h, nq, d = query
    nk, dv = key[-2], value[-1]
    return 2 * b * h * nq * nk * (d + dv)


def counted_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """PyTorch's count for one forward pass, SDPA included, halved (it counts 2 FLOPs per MAC)."""
    # The counter's module tracker hooks the gradients of module inputs, and fails ("Expected gradient
    # function to be set") on a parameter expanded under no_grad (AttentionPoolLatent's latent query):
    # count with the parameters frozen, which changes no figure.
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False, custom_mapping={op: _sdpa_flops for op in SDPA_OPS}) as counter:
            with torch.no_grad():
                model(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops() / 2


def versions() -> str:
    """The releases a figure was measured with, for failure messages and report headers."""
    import platform

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("timm", "optuna", "sqlalchemy", "optuna_dashboard"):
        try:
            module = __import__(name)
            parts.append(f"{name.replace('_', '-')} {getattr(module, '__version__', '?')}")
        except ImportError:
            parts.append(f"{name.replace('_', '-')} not installed")
    return ", ".join(parts)
