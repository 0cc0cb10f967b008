"""Vocab-parallel cross-entropy whose passes over the logits are torch.compile'd.

megatron-core's vocab-parallel cross-entropy (``megatron.core.tensor_parallel.cross_entropy``) upcasts the
logits to a float32 copy, turns it into the softmax in place and keeps that for backward. This one keeps
the logits in their own dtype and one float32 log-sum-exp per token, and recomputes the softmax in
backward. Each pass over the logits is one compiled function (inductor fuses the upcast, the exponentials
and the reductions); the collectives over the tensor-parallel group run between them, outside compiled
code. With a group of one rank it is the full-vocabulary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility


def _local_terms(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """Per row of this rank's vocabulary slice [..., v_local], in float32: the max, the sum of
    exp(logit - that max), and the label's logit where the label falls in the slice (0 elsewhere)."""
    logits = logits.float()
    local_max = logits.amax(dim=-1)
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    local_labels = labels - vocab_start
    inside = (local_labels >= 0) & (local_labels < logits.shape[-1])
    target = logits.gather(-1, torch.where(inside, local_labels, 0).unsqueeze(-1)).squeeze(-1)
    return local_max, sum_exp, torch.where(inside, target, 0.0)


def _logits_grad(logits, labels, vocab_start: int, log_sum_exp, grad_loss):
    """(softmax - one-hot of the label) * grad_loss on this rank's vocabulary slice, in the logits' dtype."""
    softmax = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1))
    vocab_ids = torch.arange(logits.shape[-1], device=logits.device) + vocab_start
    is_label = vocab_ids == labels.unsqueeze(-1)
    return ((softmax - is_label.float()) * grad_loss.unsqueeze(-1)).to(logits.dtype)


# Compiled on first call.
_compiled_local_terms = torch.compile(_local_terms)
_compiled_logits_grad = torch.compile(_logits_grad)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.shape[-1], group.rank(), group.size()
        )
        local_max, sum_exp, target = _compiled_local_terms(logits, labels, vocab_start)
        # The max and the sum of exponentials come out of one pass over the logits: each rank's sum is
        # rescaled from its own max to the global one afterwards.
        split = group.size() > 1
        global_max = local_max.clone()
        if split:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # One all-reduce for both sums (as megatron's fused cross-entropy): the target is 0 on every rank
        # but the label's.
        sums = torch.stack((sum_exp * torch.exp(local_max - global_max), target))
        if split:
            dist.all_reduce(sums, group=group)
        log_sum_exp = global_max + torch.log(sums[0])
        ctx.save_for_backward(logits, labels, log_sum_exp)
        ctx.vocab_start = vocab_start
        return log_sum_exp - sums[1]

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, log_sum_exp = ctx.saved_tensors
        return _compiled_logits_grad(logits, labels, ctx.vocab_start, log_sum_exp, grad_loss), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Per-token cross-entropy [b, t] in float32 of logits [t, b, v / n] split over the vocabulary across
    the n ranks of ``group`` (rank r holds ids [r v / n, (r + 1) v / n)) and labels [b, t]."""
    return _VocabParallelCrossEntropy.apply(logits, labels.t(), group).t()
