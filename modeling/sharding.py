"""Move parameters between one full (TP=1, PP=1) state dict and a tensor/pipeline-parallel model.

megatron-core marks each TP-split parameter with ``partition_dim`` and ``partition_stride``: the
full tensor is cut along ``partition_dim`` into ``tp * stride`` equal pieces and rank r holds
pieces r, r + tp, ... (stride 2 is SwiGLU's fc1: [gate_r; up_r] per rank). Pipeline stages hold
layers ``decoder.layers.{local}`` whose global index is ``layer.layer_number - 1``; with tied
embeddings, a last stage's ``output_layer.weight`` is a copy of ``embedding.word_embeddings.weight``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(local_name: str, first_layer: int, tied_output: bool) -> str:
    """The full-model name of a stage's parameter: its layers start at global index ``first_layer``;
    ``tied_output``: the stage's ``output_layer.weight`` is a copy of the tied embedding."""
    match = _LAYER.match(local_name)
    if match:
        return f"decoder.layers.{first_layer + int(match.group(1))}." + local_name[match.end() :]
    if local_name == "output_layer.weight" and tied_output:
        return "embedding.word_embeddings.weight"
    return local_name


def rank_layers(num_layers: int, pipeline: int, virtual_pipeline: int, pipeline_rank: int) -> List[int]:
    """Global indices of the layers a pipeline rank holds, chunk by chunk: with ``virtual_pipeline`` chunks of
    ``n = num_layers / (pipeline * virtual_pipeline)`` layers, chunk c of rank p holds layers from
    ``(c * pipeline + p) * n`` (megatron's ``get_transformer_layer_offset``)."""
    per_chunk = num_layers // (pipeline * virtual_pipeline)
    return [
        (chunk * pipeline + pipeline_rank) * per_chunk + i
        for chunk in range(virtual_pipeline)
        for i in range(per_chunk)
    ]


def split_chunk_name(name: str) -> Tuple[int, str]:
    """(chunk index, name inside the chunk) of a ``ModelChunks`` parameter name."""
    chunk, local = name.split(".", 1)
    return int(chunk), local


def global_names(model) -> Dict[str, str]:
    """Local parameter name -> name in the full (single-stage) model. ``model`` is one stage's model or a
    ``ModuleList`` of a rank's model chunks (``modeling.model.ModelChunks``: names start with the chunk index)."""
    if isinstance(model, torch.nn.ModuleList):
        return {
            f"{index}.{local}": full for index, chunk in enumerate(model) for local, full in global_names(chunk).items()
        }
    first_layer = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    return {
        name: global_name(name, first_layer, model.share_embeddings_and_output_weights)
        for name, _ in model.named_parameters()
    }


def split_tensor_parallel(full: torch.Tensor, tp: int, rank: int, dim: int, stride: int = 1) -> torch.Tensor:
    """TP rank ``rank``'s shard of a full tensor cut along ``dim`` (pieces rank, rank + tp, ... of tp * stride)."""
    pieces = full.chunk(tp * stride, dim=dim)
    return torch.cat(pieces[rank::tp], dim=dim)


def merge_tensor_parallel(shards: List[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of split_tensor_parallel: the full tensor from every TP rank's shard, in rank order."""
    per_rank = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(len(shards))], dim=dim)


def _is_split(param) -> bool:
    return getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1


def shard_for_this_rank(full: torch.Tensor, param) -> torch.Tensor:
    if not _is_split(param):
        return full
    return split_tensor_parallel(
        full,
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
        param.partition_dim,
        getattr(param, "partition_stride", 1),
    )


def gather_from_tensor_parallel(local: torch.Tensor, param) -> torch.Tensor:
    """Inverse of shard_for_this_rank: the full tensor, on every TP rank."""
    if not _is_split(param):
        return local
    shards = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return merge_tensor_parallel(shards, param.partition_dim, getattr(param, "partition_stride", 1))


@torch.no_grad()
def load_full_state_dict(model, full_state: Dict[str, torch.Tensor]) -> None:
    """Copy this rank's part of a full state dict into the model; every local parameter must be there, and
    every layer parameter of the state dict must be one the model's layers have (a weight of another
    architecture is never dropped silently)."""
    names = global_names(model)
    layer_parts = {_LAYER.sub("", full) for full in names.values() if _LAYER.match(full)}
    unexpected = sorted(k for k in full_state if _LAYER.match(k) and _LAYER.sub("", k) not in layer_parts)
    if layer_parts and unexpected:
        raise KeyError(
            f"the full state dict holds layer parameters this model does not have: {unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''}"
        )
    for name, param in model.named_parameters():
        full_name = names[name]
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
