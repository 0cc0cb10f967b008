"""Move parameters between one full (TP=1, PP=1) state dict and a tensor/pipeline-parallel model.

megatron-core marks each TP-split parameter with ``partition_dim`` and ``partition_stride``: the
full tensor is cut along ``partition_dim`` into ``tp * stride`` equal pieces and rank r holds
pieces r, r + tp, ... (stride 2 is SwiGLU's fc1: [gate_r; up_r] per rank). Pipeline stages hold
layers ``decoder.layers.{local}`` whose global index is ``layer.layer_number - 1``; with tied
embeddings, a last stage's ``output_layer.weight`` is a copy of ``embedding.word_embeddings.weight``.
"""

from __future__ import annotations

import re
from typing import Dict

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_names(model) -> Dict[str, str]:
    """Local parameter name -> name in the full (single-stage) model."""
    names = {}
    for name, _ in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = model.decoder.layers[int(match.group(1))]
            name_full = f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
        elif name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            # A last stage without the embedding holds a tied copy of it.
            name_full = "embedding.word_embeddings.weight"
        else:
            name_full = name
        names[name] = name_full
    return names


def _is_split(param) -> bool:
    return getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1


def shard_for_this_rank(full: torch.Tensor, param) -> torch.Tensor:
    if not _is_split(param):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    stride = getattr(param, "partition_stride", 1)
    pieces = full.chunk(tp * stride, dim=param.partition_dim)
    return torch.cat(pieces[rank::tp], dim=param.partition_dim)


def gather_from_tensor_parallel(local: torch.Tensor, param) -> torch.Tensor:
    """Inverse of shard_for_this_rank: the full tensor, on every TP rank."""
    if not _is_split(param):
        return local
    tp = parallel_state.get_tensor_model_parallel_world_size()
    stride = getattr(param, "partition_stride", 1)
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    per_rank = [shard.chunk(stride, dim=param.partition_dim) for shard in shards]
    pieces = [per_rank[r][s] for s in range(stride) for r in range(tp)]
    return torch.cat(pieces, dim=param.partition_dim)


@torch.no_grad()
def load_full_state_dict(model, full_state: Dict[str, torch.Tensor]) -> None:
    """Copy this rank's part of a full state dict into the model; every local parameter must be there."""
    for name, param in model.named_parameters():
        full_name = global_names(model)[name]
        if full_name not in full_state:
            raise KeyError(f"parameter {full_name!r} missing from the full state dict")
        shard = shard_for_this_rank(full_state[full_name], param)
        if shard.shape != param.shape:
            raise ValueError(f"{full_name}: shard {tuple(shard.shape)} does not fit parameter {tuple(param.shape)}")
        param.copy_(shard)


def full_tensors(model, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Gather per-parameter tensors (weights or gradients, keyed by local name) over TP and PP.

    Returns full tensors keyed by full name, on every rank of the model-parallel group.
    """
    names = global_names(model)
    params = dict(model.named_parameters())
    gathered = {names[n]: gather_from_tensor_parallel(t, params[n]).cpu() for n, t in tensors.items()}
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return gathered
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, gathered, group=parallel_state.get_pipeline_model_parallel_group())
    merged = {}
    for stage in stages:
        merged.update(stage)
    return merged


def full_state_dict(model) -> Dict[str, torch.Tensor]:
    return full_tensors(model, {n: p.detach() for n, p in model.named_parameters()})
