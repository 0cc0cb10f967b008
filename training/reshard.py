"""Resume a checkpoint on another layout (tensor, pipeline, virtual pipeline, data- and/or context-parallel size),
optimizer state included.

Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``checkpoint.load_universal``): it
keys every tensor by DeepSpeed's parameter name, and megatron-core stages name their layers locally
(``decoder.layers.0`` is a different layer on every pipeline stage), so the stages' tensors would land
under one name; its pipeline support reads Megatron-DeepSpeed's PipelineModule files, which megatron's
own schedules do not write. The mapping here does the same job with global names:

1. Per old (tensor, pipeline) rank, the ZeRO files of its data-parallel ranks (DeepSpeed's: the data- x
   context-parallel ranks) hold the flat fp32 master partitions and the base optimizer's flat state
   (Adam's exp_avg, exp_avg_sq; its step); DeepSpeed's ``param_slice_mappings`` say where each
   parameter's slice lies in each partition. The slices, concatenated in DP order, give the parameter's
   TP shard; names become global (``modeling.sharding.global_name``: layer offset of the rank's model
   chunk, the tied output layer).
2. The old TP shards merge into the full tensor and split for this rank, by the partition dim and
   stride of this rank's parameter (QKV by contiguous KV groups, SwiGLU's fc1 with stride 2, the
   padded vocabulary by rows; the padded size does not depend on TP).
3. The new engine takes them through DeepSpeed's elastic ZeRO-1/2 loader as if the checkpoint had
   been saved on this layout (it re-partitions for the current DP size); the model weights are the
   fp32 masters cast to the model dtype, as after any optimizer step. LR schedule and engine counters
   come from the old model-states file.
4. Rank state: the carried memory is regathered by (layer, lane, KV group)
   (``training.memory_state.regather_memory``; the ranks of a CP group carry the same memory, the one after
   the window's last segment: the last CP rank's is taken), data positions are merged over the old DP ranks,
   progress counters and the W&B run id come from old rank 0. RNG streams have no counterpart on
   another layout: every rank reseeds from (seed, step) the way a fresh run seeds from seed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    BASE_OPTIMIZER_STATE,
    BASE_OPTIMIZER_STATE_STEP,
    CLIP_GRAD,
    DS_VERSION,
    LOSS_SCALER,
    OPTIMIZER_STATE_DICT,
    PARAM_ALIGNMENT_PADDINGS,
    PARAM_SLICE_MAPPINGS,
    SINGLE_PARTITION_OF_FP32_GROUPS,
)
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from data_pipeline import merge_state_dicts
from modeling.sharding import global_names, merge_tensor_parallel, split_tensor_parallel
from training.checkpoint_layout import (
    CheckpointError,
    SavedCheckpoint,
    context_rank,
    coordinates,
    layout,
    parallel_sizes,
)
from training.config import TrainConfig
from training.memory_state import regather_memory
from training.rng import rng_state

RESHARDABLE_ZERO_STAGES = (1, 2)
# What the ZeRO-1/2 optimizer keeps beside its partitions, copied from the saved files unchanged.
_ZERO_GLOBAL_STATE = (LOSS_SCALER, "dynamic_loss_scale", "overflow", CLIP_GRAD, DS_VERSION, BASE_OPTIMIZER_STATE_STEP)

ParamStates = Dict[str, Dict[str, torch.Tensor]]


def describe(layout_: dict, zero_stage: int) -> str:
    tensor, pipeline, data, context, virtual_pipeline = parallel_sizes(layout_)
    context_part = f" context={context}" if context > 1 else ""
    virtual_part = f" virtual_pipeline={virtual_pipeline}" if virtual_pipeline > 1 else ""
    return f"tensor={tensor} pipeline={pipeline}{virtual_part} data={data}{context_part} ZeRO-{zero_stage}"


def stage_names(saved: SavedCheckpoint, pipeline: int, num_layers: int, tie_embeddings: bool) -> Dict[str, str]:
    """Local parameter name -> global name, for an old pipeline rank."""
    shapes = saved.model_states(0, pipeline)["param_shapes"]
    return {name: saved.global_name(name, pipeline, num_layers, tie_embeddings) for group in shapes for name in group}


def shard_states(saved: SavedCheckpoint, tensor: int, pipeline: int) -> Tuple[ParamStates, dict, dict]:
    """One old (tensor, pipeline) rank's optimizer state, merged over its DP ranks.

    Returns per local parameter name its fp32 master and elementwise optimizer state (its TP
    shard, in the parameter's shape); the optimizer's scalar state (Adam's step), which all
    groups and partitions share; and the ZeRO optimizer's other saved state.
    """
    fragments: Dict[str, Dict[str, List[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    scalars: dict = {}
    # DeepSpeed's data-parallel ranks are the DP x CP ranks; their partitions concatenate in its rank order.
    _, _, data_size, context_size, _ = parallel_sizes(saved.layout)
    for data in range(data_size * context_size):
        path = saved.zero_file(tensor, pipeline, data)
        zero = saved.zero_states(tensor, pipeline, data)[OPTIMIZER_STATE_DICT]
        if any(any(group) for group in zero.get(PARAM_ALIGNMENT_PADDINGS, [])):
            raise CheckpointError(
                f"{path} was saved with zero_optimization.parameter_alignment; resharding "
                "reads unaligned ZeRO partitions only"
            )
        for group, mapping in enumerate(zero[PARAM_SLICE_MAPPINGS]):
            flat = {"fp32": zero[SINGLE_PARTITION_OF_FP32_GROUPS][group]}
            for key, value in zero[BASE_OPTIMIZER_STATE][group].items():
                if torch.is_tensor(value) and value.shape == flat["fp32"].shape:
                    flat[key] = value
                else:
                    _agree(scalars, key, value, path)
            for name, address in mapping.items():
                for key, tensor_ in flat.items():
                    fragments[name][key].append(tensor_.narrow(0, address.start, address.numel))
    states: ParamStates = {}
    for group in saved.model_states(tensor, pipeline)["param_shapes"]:
        for name, shape in group.items():
            states[name] = {key: torch.cat(parts) for key, parts in fragments[name].items()}
            if "fp32" not in states[name] or any(t.numel() != shape.numel() for t in states[name].values()):
                raise CheckpointError(
                    f"{saved.path}: the ZeRO partitions of tensor={tensor} pipeline={pipeline} "
                    f"do not add up to parameter {name} {tuple(shape)}"
                )
            states[name] = {key: t.view(shape) for key, t in states[name].items()}
    return states, scalars, {key: zero[key] for key in _ZERO_GLOBAL_STATE}


def _agree(scalars: dict, key: str, value, path: str) -> None:
    if key in scalars and not torch.equal(torch.as_tensor(scalars[key]), torch.as_tensor(value)):
        raise CheckpointError(
            f"{path}: optimizer state {key!r} differs between parameter groups or ranks ({scalars[key]} and {value})"
        )
    scalars[key] = value


def resharded_optimizer_states(
    model, saved: SavedCheckpoint, num_layers: int, tie_embeddings: bool
) -> Tuple[ParamStates, dict, dict]:
    """Per local parameter of this rank: fp32 master and optimizer state, cut from the old layout's shards."""
    params = dict(model.named_parameters())
    local_by_global = {full: local for local, full in global_names(model).items()}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    out: ParamStates = {}
    scalars, zero_state = {}, {}
    for pipeline in range(saved.layout["pipeline"]):
        # The tied embedding is on the first and the last stage: take it once.
        wanted = {
            old: full
            for old, full in stage_names(saved, pipeline, num_layers, tie_embeddings).items()
            if full in local_by_global and local_by_global[full] not in out
        }
        if not wanted:
            continue
        shards = [shard_states(saved, tensor, pipeline) for tensor in range(saved.layout["tensor"])]
        zero_state = shards[0][2]
        for _, shard_scalars, _ in shards:
            for key, value in shard_scalars.items():
                _agree(scalars, key, value, saved.path)
        for old_name, full_name in wanted.items():
            param = params[local_by_global[full_name]]
            out[local_by_global[full_name]] = {
                key: _reshard(full_name, param, [states[old_name][key] for states, _, _ in shards], tp, tp_rank)
                for key in shards[0][0][old_name]
            }
    missing = sorted(global_names(model)[name] for name in params if name not in out)
    if missing:
        raise CheckpointError(
            f"{saved.path} holds no state for {missing[:4]}{'...' if len(missing) > 4 else ''}: "
            "was it saved with another model configuration?"
        )
    return out, scalars, zero_state


def _reshard(name: str, param, shards: List[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False):
        dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
        local = split_tensor_parallel(merge_tensor_parallel(shards, dim, stride), tp, tp_rank, dim, stride)
    else:
        local = shards[0]  # replicated over TP ranks
    if local.shape != param.shape:
        raise CheckpointError(
            f"saved {name} gives a shard of shape {tuple(local.shape)} on this layout; the model "
            f"has {tuple(param.shape)}: was it saved with another model configuration?"
        )
    return local


@torch.no_grad()
def write_into_engine(engine, model, states: ParamStates, scalars: dict, zero_state: dict) -> None:
    """Hand the states to DeepSpeed's elastic ZeRO-1/2 loader, laid out as a checkpoint of this layout."""
    group_shapes = engine._get_zero_param_shapes()
    flat_groups = [
        {key: torch.cat([states[name][key].flatten() for name in shapes]) for key in states[next(iter(shapes))]}
        for shapes in group_shapes
    ]
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    # The loader concatenates all saved partitions and reads global state from this DP rank's one.
    pieces = [{key: flat.tensor_split(dp) for key, flat in group.items()} for group in flat_groups]
    state_dict_list = [
        {
            **zero_state,
            SINGLE_PARTITION_OF_FP32_GROUPS: [group["fp32"][index] for group in pieces],
            BASE_OPTIMIZER_STATE: [
                {**scalars, **{key: parts[index] for key, parts in group.items() if key != "fp32"}} for group in pieces
            ],
            PARAM_ALIGNMENT_PADDINGS: [[0] * len(shapes) for shapes in group_shapes],
        }
        for index in range(dp)
    ]
    engine.optimizer.load_state_dict(
        state_dict_list=state_dict_list,
        load_optimizer_states=True,
        load_from_fp32_weights=True,
        param_shapes=group_shapes,
    )
    for name, param in model.named_parameters():
        param.copy_(states[name]["fp32"].to(param.dtype))


def restore_engine_counters(engine, model_states: dict) -> None:
    engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states["global_samples"]
    engine.skipped_steps = model_states["skipped_steps"]


def reseeded_rng_state(seed: int, step: int) -> dict:
    """The RNG states of a resharded resume: every rank seeds from (seed, step) as a fresh run seeds
    from seed (megatron's CUDA tracker adds its TP offsets)."""
    derived = (seed * 1_000_003 + step) % 2**31
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(derived)
    return rng_state()


def resharded_rank_state(saved: SavedCheckpoint, cfg: TrainConfig, layers: List[int], lane_ids: List[int]) -> dict:
    """This rank's rank state on the new layout (its global ``layers``, counted from 0, and ``lane_ids``), built
    from all old ranks' states: the carried memory regathered, data positions merged, RNG reseeded, and
    everything else (progress counters, the W&B run id) as old rank 0 saved it."""
    old = saved.rank_states
    first = next(s for s in old if s["coordinates"]["rank"] == 0)
    last_context_rank = parallel_sizes(saved.layout)[3] - 1
    memory_holders = [s for s in old if context_rank(s) == last_context_rank]
    try:
        saved_layers = [
            saved.rank_layers(pipeline, cfg.model.num_layers) for pipeline in range(saved.layout["pipeline"])
        ]
        memory = regather_memory(
            memory_holders,
            saved.layout["tensor"],
            saved_layers,
            cfg.data.global_lanes,
            layers,
            lane_ids,
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
    except ValueError as error:
        raise CheckpointError(f"{saved.path}: {error}") from error
    # TP/PP/CP peers read the same lanes: one rank per old DP rank holds every lane's position.
    data = merge_state_dicts(
        [
            s["data"]
            for s in old
            if s["coordinates"]["tensor"] == 0 and s["coordinates"]["pipeline"] == 0 and context_rank(s) == 0
        ]
    )
    return {
        **first,
        "coordinates": coordinates(),
        "lane_ids": list(lane_ids),
        "memory": memory,
        "data": data,
        "rng": reseeded_rng_state(cfg.seed, first["train_state"]["step"]),
    }


def load_resharded(path: str, manifest: dict, cfg: TrainConfig, engine, model, lane_ids: List[int]) -> dict:
    """Load ``path``, saved on another layout, into this run's engine and model (collective).

    Returns this rank's state in the form of a rank file of this layout (``CheckpointManager.rank_state``).
    """
    saved_stage, zero_stage = manifest["zero_stage"], cfg.parallel.zero_stage
    was, now = describe(manifest["layout"], saved_stage), describe(layout(), zero_stage)
    if saved_stage not in RESHARDABLE_ZERO_STAGES or zero_stage not in RESHARDABLE_ZERO_STAGES:
        raise CheckpointError(
            f"{path} was saved with {was}; this run has {now}. Changing the layout is supported from and to "
            "ZeRO-1/2 only: resume a ZeRO-3 checkpoint on its own tensor, pipeline and data-parallel sizes, or "
            "export the model (training.export) and start the new layout with checkpoint.init_from (fresh optimizer)"
        )
    saved = SavedCheckpoint(path, manifest)
    states, scalars, zero_state = resharded_optimizer_states(
        model, saved, cfg.model.num_layers, cfg.model.tie_embeddings
    )
    write_into_engine(engine, model, states, scalars, zero_state)
    restore_engine_counters(engine, saved.model_states())
    rank_state = resharded_rank_state(saved, cfg, [layer.layer_number - 1 for layer in model.layers], lane_ids)
    if dist.get_rank() == 0:
        print(
            f"resharded {path}: saved with {was}, now {now}; weights, fp32 master weights and optimizer "
            f"state (step {rank_state['train_state']['step']}) re-split, carried memory regathered, RNG "
            "reseeded from (seed, step)",
            flush=True,
        )
    return rank_state
