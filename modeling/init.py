"""Layout-independent initialisation: the same seed gives the same full model on any TP/PP split.

Each parameter's full (TP=1) tensor is drawn from a generator seeded by (seed, its full name), on
the parameter's device, and this rank keeps its shard. megatron-core's own initialisation depends
on which modules a rank builds (a later pipeline stage has no embedding), so runs on different
layouts would start from different weights.
"""

from __future__ import annotations

import math
import zlib

import torch

from modeling.layers import is_gate_parameter, is_memory_scale_parameter
from modeling.sharding import global_names, shard_for_this_rank

_SCALED_OUTPUTS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _full_shape(param) -> list:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        from megatron.core import parallel_state

        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return shape


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    config = model.config
    output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    names = global_names(model)
    for local_name, param in model.named_parameters():
        name = names[local_name]
        if is_memory_scale_parameter(param):
            param.zero_()  # log scale 0: scale exactly 1, the paper's read
            continue
        if is_gate_parameter(param):
            param.fill_(config.infini_gate_init)
            continue
        if param.dim() < 2:
            param.fill_(1.0)  # RMSNorm weights
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        std = output_std if name.endswith(_SCALED_OUTPUTS) else config.init_method_std
        full = torch.empty(_full_shape(param), device=param.device, dtype=torch.float32)
        full.normal_(0.0, std, generator=generator)
        param.copy_(shard_for_this_rank(full, param))
