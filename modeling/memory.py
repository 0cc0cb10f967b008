"""The compressive memory's state and the running sum that carries it over segments.

Infini-attention keeps per KV head a memory M [d_k, d_v] and a normaliser z [d_k] in float32; a
segment reads the memory left by the segments before it, and a document start (a reset) empties it.
modeling/infini_attention.py computes with them, as do the fused kernels (modeling/memory_kernels.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

UPDATE_RULES = ("linear", "delta")


class InfiniMemory(NamedTuple):
    """Compressive memory of one attention layer: M [b, kv_heads, d_k, d_v], z [b, kv_heads, d_k]."""

    M: torch.Tensor
    z: torch.Tensor


def memory_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Memory math runs in float32 for half-precision inputs (float64 stays float64, for gradcheck)."""
    return torch.promote_types(input_dtype, torch.float32)


def empty_memory(batch, kv_heads, head_dim, head_dim_v, device=None, dtype=torch.float32) -> InfiniMemory:
    return InfiniMemory(
        torch.zeros(batch, kv_heads, head_dim, head_dim_v, dtype=dtype, device=device),
        torch.zeros(batch, kv_heads, head_dim, dtype=dtype, device=device),
    )


def exclusive_cumsum_with_resets(updates, initial, reset, extra_dims):
    """Per segment s: initial (if no reset at or before s) + sum of updates since the last reset, before s.

    updates: [b, g, s, *extra]; initial: [b, g, *extra]; reset: bool [b, s] or None.
    """
    inclusive = updates.cumsum(dim=2)
    exclusive = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    if reset is None:
        return exclusive + initial.unsqueeze(2)
    b, s = reset.shape
    positions = torch.arange(s, device=reset.device).expand(b, s)
    # Index of the last reset at or before each segment, -1 where there was none.
    last_reset = torch.where(reset, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    shape = (b, 1, s) + (1,) * extra_dims
    index = last_reset.clamp(min=0).view(shape).expand_as(exclusive)
    since_reset = exclusive - torch.gather(exclusive, 2, index) * (last_reset >= 0).view(shape)
    keep_initial = (last_reset < 0).to(updates.dtype).view(shape)
    return since_reset + initial.unsqueeze(2) * keep_initial
