"""Context parallelism for Infini-attention: the memory exchange between the ranks of a CP group.

A window's segments are split into contiguous groups, one per CP rank (rank r holds segments
r * s/C .. (r + 1) * s/C - 1). Local attention never leaves a segment, so the only thing a rank needs
from the others is the memory before its first segment. With the linear update that memory is a sum:
the carried memory plus every earlier segment's write sigma(K)^T V (and sum_t sigma(K_t) for z), each
cut at the last reset. So each rank sums its own segments' writes since its last reset (its "writes"),
one all-gather gives every rank every rank's writes and whether its segments hold a reset, and each
rank adds up what it needs. Backward is the mirrored reduce-scatter: a rank's writes get the
gradients of every later rank's reads. The traffic per layer is C x (d_k x d_v + d_k) values per KV
head and lane, whatever the window's length.

The delta update reads M_{s-1} before writing, so a rank's writes depend on the memory it starts
from: ranks would have to run one after another. It is refused with context parallelism.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist


class _AllGatherStacked(torch.autograd.Function):
    """[rows, ...] on every rank -> [ranks, rows, ...]; backward sums the gradients of a rank's rows over
    the group (reduce-scatter). megatron's gather_from_sequence_parallel_region does the same but puts its
    buffers on the current CUDA device, which a CPU run has not."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ranks = group.size()
        out = torch.empty((ranks * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return out.view((ranks,) + tuple(local.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        local = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(local, grad.flatten(0, 1), group=ctx.group)
        return local, None


def _sum_since_last_reset(
    carried: torch.Tensor, writes: torch.Tensor, has_reset: torch.Tensor, ranks_before: int
) -> torch.Tensor:
    """The memory after the first ``ranks_before`` ranks' segments.

    carried: [b, *extra]; writes: [ranks, b, *extra]; has_reset: bool [ranks, b]. The sum of the writes
    of ranks since the last one (of those) holding a reset, plus the carried memory if none does. Every
    rank's writes enter the sum, with weight 0 where unused, so that every rank's backward reaches the
    all-gather (a collective every rank of the group must join).
    """
    ranks, b = has_reset.shape
    extra = (1,) * (writes.dim() - 2)
    rank_ids = torch.arange(ranks, device=has_reset.device).view(ranks, 1).expand(ranks, b)
    before = rank_ids < ranks_before
    last_reset = torch.where(has_reset & before, rank_ids, torch.full_like(rank_ids, -1)).max(dim=0).values
    weights = (before & (rank_ids >= last_reset)).to(writes.dtype).view(ranks, b, *extra)
    keep_carried = (last_reset < 0).to(writes.dtype).view(b, *extra)
    return carried * keep_carried + (weights * writes).sum(dim=0)


Memory = Tuple[torch.Tensor, torch.Tensor]


def exchange_memory(carried: Memory, writes: Memory, has_reset: torch.Tensor, group) -> Tuple[Memory, Memory]:
    """(memory before this rank's first segment, memory after the window's last segment), each (M, z).

    carried: (M [b, g, d, dv], z [b, g, d]) at the window's start, the same on every rank of the group;
    writes: this rank's segments' writes since its last reset (all of them if none), shaped alike;
    has_reset: bool [b], whether this rank's segments hold a reset. One all-gather over ``group``.
    """
    (carried_M, carried_z), (writes_M, writes_z) = carried, writes
    b, g, d, dv = writes_M.shape
    payload = torch.cat(
        [writes_M.reshape(b, -1), writes_z.reshape(b, -1), has_reset.to(writes_M.dtype).view(b, 1)], dim=1
    )
    gathered = _AllGatherStacked.apply(payload, group)
    ranks = gathered.shape[0]
    all_M = gathered[..., : g * d * dv].reshape(ranks, b, g, d, dv)
    all_z = gathered[..., g * d * dv : -1].reshape(ranks, b, g, d)
    all_reset = gathered[..., -1].detach() > 0
    rank = group.rank()
    incoming = (
        _sum_since_last_reset(carried_M, all_M, all_reset, rank),
        _sum_since_last_reset(carried_z, all_z, all_reset, rank),
    )
    final = (
        _sum_since_last_reset(carried_M, all_M, all_reset, ranks),
        _sum_since_last_reset(carried_z, all_z, all_reset, ranks),
    )
    return incoming, final
