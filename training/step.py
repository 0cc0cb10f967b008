"""One training or validation step: megatron-core's schedule over the microbatches of a batch.

A batch holds this data-parallel rank's lanes; microbatch i is always the same group of lanes, so
its carried memory (one per model chunk, ``CarriedMemory`` slot i) follows those lanes from
step to step. Every rank of a TP/PP group reads the same lanes: the first stage uses the tokens,
every stage the reset flags, the last stage the labels and loss mask. The ranks of a context-parallel
group read the same lanes too, and each keeps its contiguous share of every window (``context_share``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from modeling.cpu_compat import megatron_on_cpu
from modeling.model import ModelChunks
from training.memory_state import CarriedMemory


@dataclass
class Microbatch:
    slot: int
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    reset: torch.Tensor


def context_share(batch: Dict[str, torch.Tensor], rank: int, ranks: int) -> Dict[str, torch.Tensor]:
    """Context-parallel rank ``rank`` of ``ranks``: its contiguous share of every lane's window, tokens,
    labels and loss_mask [lanes, window / ranks] and reset [lanes, n_segments / ranks]."""
    if ranks == 1:
        return batch
    window, segments = batch["tokens"].shape[1], batch["reset"].shape[1]
    tokens = slice(rank * window // ranks, (rank + 1) * window // ranks)
    share = {key: batch[key][:, tokens] for key in ("tokens", "labels", "loss_mask")}
    share["reset"] = batch["reset"][:, rank * segments // ranks : (rank + 1) * segments // ranks]
    return share


def split_microbatches(batch: Dict[str, torch.Tensor], micro_batch_lanes: int, device) -> List[Microbatch]:
    lanes = batch["tokens"].shape[0]
    if lanes % micro_batch_lanes:
        raise ValueError(f"{lanes} lanes do not split into microbatches of {micro_batch_lanes}")
    out = []
    for slot in range(lanes // micro_batch_lanes):
        part = slice(slot * micro_batch_lanes, (slot + 1) * micro_batch_lanes)
        out.append(
            Microbatch(
                slot,
                batch["tokens"][part].to(device, non_blocking=True),
                batch["labels"][part].to(device, non_blocking=True),
                batch["loss_mask"][part].to(device, non_blocking=True),
                batch["reset"][part].to(device, non_blocking=True),
            )
        )
    return out


@dataclass
class StepResult:
    loss_sum: float
    """Sum of per-token losses times loss_mask (the tokens' loss weights) over the global batch."""
    weight: float
    """Sum of loss_mask over the global batch: the valid tokens' count when no token is weighted."""
    tokens: int
    """Valid tokens (loss_mask > 0) of the global batch."""

    @property
    def loss(self) -> float:
        """The weighted mean per-token loss (the plain mean when the data has no loss weights)."""
        return self.loss_sum / self.weight if self.weight > 0 else 0.0


def _data_and_context_parallel_group():
    """The ranks that split the global batch: by lanes (DP) and by each window's segments (CP)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _global_weight_and_tokens(microbatches: List[Microbatch], device) -> torch.Tensor:
    local = torch.stack(
        [
            sum(mb.loss_mask.sum() for mb in microbatches).double(),
            sum((mb.loss_mask > 0).sum() for mb in microbatches).double(),
        ]
    ).to(device)
    dist.all_reduce(local, group=_data_and_context_parallel_group())
    return local


def run_schedule(
    model: ModelChunks,
    carried: CarriedMemory,
    microbatches: List[Microbatch],
    *,
    forward_only: bool,
    loss_scale: float = 1.0,
    engine=None,
) -> StepResult:
    """Forward (and backward) over all microbatches through every model chunk of the rank; the loss is
    the global batch's per-token mean, weighted by loss_mask: sum(loss * loss_mask) / sum(loss_mask).

    The forward calls go through the DeepSpeed engine when given: its hooks on the outputs drive
    ZeRO-2/3's gradient partitioning during megatron's backward. loss_scale multiplies the loss used
    for gradients (NaN injection uses it); the reported loss is unscaled.
    """
    forward_module = engine if engine is not None else model
    device = microbatches[0].tokens.device
    reducing_ranks = _data_and_context_parallel_group().size()
    global_weight, global_tokens = _global_weight_and_tokens(microbatches, device)

    def loss_func(mb: Microbatch, per_token_loss: torch.Tensor):
        loss_sum = (per_token_loss.float() * mb.loss_mask).sum()
        # DeepSpeed averages gradients over DP x CP ranks; the schedule sums microbatches (per-token mode).
        scaled = loss_sum * (reducing_ranks / global_weight.to(loss_sum.dtype)) * loss_scale
        return scaled, (mb.loss_mask > 0).sum().int(), {"loss_sum": loss_sum.detach()}

    def forward_step(data_iterator: Iterator[Microbatch], chunk):
        # Every chunk reads the microbatches in order from its own iterator (megatron's interleaved schedule
        # passes data_iterator[chunk]); each (chunk, slot) carries its own memory.
        mb = next(data_iterator)
        output, memory = forward_module(
            chunk.vp_stage,
            mb.tokens if chunk.pre_process else None,
            mb.labels if chunk.post_process else None,
            carried.get(chunk.vp_stage, mb.slot),
            mb.reset,
        )
        carried.set(chunk.vp_stage, mb.slot, memory)
        return output, partial(loss_func, mb)

    micro_lanes, rank_tokens = microbatches[0].tokens.shape
    with megatron_on_cpu():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(microbatches) for _ in model],
            model=list(model),
            num_microbatches=len(microbatches),
            # The whole window: megatron divides it by the CP size for the pipeline's activations.
            seq_length=rank_tokens * parallel_state.get_context_parallel_world_size(),
            micro_batch_size=micro_lanes,
            forward_only=forward_only,
        )
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        loss_sum += sum(out["loss_sum"].double() for out in outputs)
    # The last stage's sum, over DP x CP, reaches every rank (each decides alike whether to skip a step).
    dist.all_reduce(loss_sum, group=_data_and_context_parallel_group())
    dist.broadcast(
        loss_sum,
        parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return StepResult(loss_sum.item(), global_weight.item(), int(global_tokens.item()))


def allreduce_tied_embedding_grads(model: ModelChunks) -> None:
    """With tied embeddings over several stages, the first stage's first chunk and the last stage's last
    chunk each hold a copy."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    for chunk in model:
        if chunk.share_embeddings_and_output_weights and (chunk.pre_process or chunk.post_process):
            dist.all_reduce(chunk.shared_embedding_or_output_weight().grad, group=parallel_state.get_embedding_group())


def is_finite(value: float) -> bool:
    return value is not None and math.isfinite(value)
