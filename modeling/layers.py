"""Infini-attention inside megatron-core: core attention, self-attention, transformer layer, layer spec.

Memory structure: every layer's attention keeps, per sequence of the batch and per key/value head
that this tensor-parallel rank owns, an ``InfiniMemory(M [b, g_local, d_k, d_v], z [b, g_local, d_k])``
in float32. It lives nowhere inside the modules: it is an input and an output of ``forward`` at every
level (attention -> layer -> model), so the caller (the trainer, per lane and pipeline stage) owns it,
and recomputation replays a layer from exactly the memory it first saw.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch.utils.checkpoint import checkpoint

from modeling.infini_attention import check_whole_segments, infini_attention, local_attention
from modeling.memory import InfiniMemory
from modeling.weight_gradients import linear_accumulating_weight_gradient

GATE_ATTRIBUTE = "is_infini_gate"
MEMORY_SCALE_ATTRIBUTE = "is_infini_memory_log_scale"


def is_gate_parameter(param: torch.nn.Parameter) -> bool:
    """Gates get their own learning rate and no weight decay (they never leave 0.5 otherwise); so do the
    learned memory scales, per-head numbers of the same kind."""
    return getattr(param, GATE_ATTRIBUTE, False) or is_memory_scale_parameter(param)


def is_memory_scale_parameter(param: torch.nn.Parameter) -> bool:
    """A learned memory scale's log (0 = scale 1, the paper's read)."""
    return getattr(param, MEMORY_SCALE_ATTRIBUTE, False)


def _head_parameter(size: int, value: float) -> torch.nn.Parameter:
    """A float32 vector with one entry per head (query or KV) of this TP rank: TP-split by heads."""
    param = torch.nn.Parameter(torch.full((size,), float(value), dtype=torch.float32))
    # Megatron and DeepSpeed read these to shard, checkpoint and norm-count it per TP rank.
    param.tensor_model_parallel = True
    param.partition_dim = 0
    param.partition_stride = 1
    return param


class TorchNorm:
    """torch's RMSNorm or LayerNorm (``config.normalization``), as megatron's WrappedTorchNorm builds them,
    but also inside the sequence-parallel region: there each TP rank normalizes its own slice of the
    sequence, so its weights are marked ``sequence_parallel`` (megatron's mark for weights whose
    gradients are partial sums over the TP group, see ``sums_gradient_over_tensor_parallel``)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization must be one of {sorted(norms)}, got {config.normalization!r}")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def sums_gradient_over_tensor_parallel(name: str, param: torch.nn.Parameter, config) -> bool:
    """Whether a parameter, the same on every TP rank, gets only part of its gradient on each: the
    weights of the sequence-parallel region (each rank sees a slice of the sequence) and the q/k norms
    (each rank sees its own heads). megatron's finalize_model_grads picks the same set."""
    if config.tensor_model_parallel_size == 1:
        return False
    if config.sequence_parallel and getattr(param, "sequence_parallel", False):
        return True
    return config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)


class _WeightGradientFusion:
    """A megatron-core parallel linear whose weight gradient, with ``config.infini_fused_weight_gradients``
    and a ``main_grad`` attached to its weight (``modeling.weight_gradients.start_weight_gradients``), is
    summed into that buffer inside its GEMM. Without a ``main_grad`` it is megatron's linear.

    It also hands megatron's matmul the tensor-parallel group the linear already holds: megatron's
    row-parallel linear passes ``tp_group=None``, and looking the group up asks torch.distributed for the
    rank, a call torch.compile cannot trace, so each such linear would split a compiled layer's graph
    (performance.compile_layers)."""

    gathers_sequence = False
    """Whether megatron's matmul all-gathers the sequence-parallel input inside itself (then it stays
    megatron's, which gathers again in backward instead of saving the gathered input)."""

    @property
    def accumulates_weight_gradient(self) -> bool:
        return self.config.infini_fused_weight_gradients and not self.gathers_sequence

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, tp_group=None, **kwargs):
        tp_group = tp_group if tp_group is not None else self.tp_group
        if not (self.accumulates_weight_gradient and weight.requires_grad and hasattr(weight, "main_grad")):
            return super()._forward_impl(
                input, weight, bias=bias, allreduce_dgrad=allreduce_dgrad, tp_group=tp_group, **kwargs
            )
        if allreduce_dgrad:
            # Identity forward, all-reduce of the input's gradient over the TP group backward.
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return linear_accumulating_weight_gradient(input, weight, bias)


class InfiniColumnParallelLinear(_WeightGradientFusion, ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear, with the weight-gradient fusion of ``_WeightGradientFusion``."""

    @property
    def gathers_sequence(self) -> bool:
        return self.sequence_parallel


class InfiniRowParallelLinear(_WeightGradientFusion, RowParallelLinear):
    """megatron-core's RowParallelLinear, with the weight-gradient fusion of ``_WeightGradientFusion``."""


class InfiniCoreAttention(MegatronModule):
    """Core attention of one layer on one TP rank: local softmax + compressive memory, mixed by gates.
    Without the memory (``config.infini_memory=False``) only the local softmax, and no parameters.

    Owns the gate beta of the query heads on this rank (a TP-partitioned parameter, dim 0). With
    ``config.infini_learned_memory_scales`` it also owns the memory's learned scales, kept as logs so
    they stay positive: the memory writes sigma(exp(memory_key_log_scale) * k), one per KV head, and is
    read with sigma(exp(memory_query_log_scale) * q), one per query head (TP-partitioned the same way).
    The configured ``infini_memory_key_scale`` / ``infini_memory_query_scale`` multiply on top. With context
    parallelism (a CP group of several ranks in pg_collection) it runs this rank's share of the window's
    segments and exchanges the memory with the other ranks of the group.
    """

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        cp_comm_type=None,
        softmax_scale=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if softmax_scale is not None:
            raise ValueError("Infini-attention uses 1/sqrt(head_dim); softmax_scale must be None")
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.context_group = getattr(pg_collection, "cp", None)
        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if heads % tp_size or groups % tp_size:
            raise ValueError(
                f"num_attention_heads ({heads}) and num_query_groups ({groups}) must be divisible "
                f"by the TP size ({tp_size})"
            )
        self.layer_number = layer_number
        self.segment_length = config.infini_segment_length
        self.update = config.infini_update
        self.half_memory_products = config.infini_half_memory_products
        self.fused_memory_read = config.infini_fused_memory_read
        self.fused_memory_write = config.infini_fused_memory_write
        self.memory_key_scale = config.infini_memory_key_scale
        self.memory_query_scale = config.infini_memory_query_scale
        self.has_memory = config.infini_memory
        self.learned_memory_scales = config.infini_learned_memory_scales
        if not self.has_memory:
            return
        self.gate = _head_parameter(heads // tp_size, config.infini_gate_init)
        setattr(self.gate, GATE_ATTRIBUTE, True)
        if self.learned_memory_scales:
            self.memory_key_log_scale = _head_parameter(groups // tp_size, 0.0)
            self.memory_query_log_scale = _head_parameter(heads // tp_size, 0.0)
            for param in (self.memory_key_log_scale, self.memory_query_log_scale):
                setattr(param, MEMORY_SCALE_ATTRIBUTE, True)

    def memory_scales(self):
        """(key scale, query scale) the memory is written and read with: numbers, or with learned scales
        tensors [g_local] and [h_local] (the learned ones times the configured ones)."""
        if not self.learned_memory_scales:
            return self.memory_key_scale, self.memory_query_scale
        return (
            self.memory_key_log_scale.exp() * self.memory_key_scale,
            self.memory_query_log_scale.exp() * self.memory_query_scale,
        )

    def forward(self, query, key, value, memory=None, reset=None, rotary_pos_emb=None):
        """query [b, h, t, d], key/value [b, g, t, d]: returns ([b, h, t, d], InfiniMemory), or without
        the memory ([b, h, t, d], None): causal attention inside each segment, reset has nothing to empty."""
        if not self.has_memory:
            if memory is not None:
                raise ValueError("this attention has no memory (infini_memory=False) but was given one")
            check_whole_segments(query.shape[2], self.segment_length)
            return local_attention(query, key, value, self.segment_length, rotary_pos_emb), None
        key_scale, query_scale = self.memory_scales()
        return infini_attention(
            query,
            key,
            value,
            self.gate,
            memory,
            segment_length=self.segment_length,
            update=self.update,
            reset=reset,
            rotary_pos_emb=rotary_pos_emb,
            half_memory_products=self.half_memory_products,
            memory_key_scale=key_scale,
            memory_query_scale=query_scale,
            context_group=self.context_group,
            fused_memory_read=self.fused_memory_read,
            fused_memory_write=self.fused_memory_write,
        )


class InfiniSelfAttention(SelfAttention):
    """megatron's SelfAttention (fused QKV column-parallel projection, optional q/k norms, row-parallel
    output projection) with Infini-attention as its core. Input and output [s, b, h]; with sequence
    parallelism [s / tp, b, h]: the QKV projection gathers the whole sequence, the core sees it all
    (and this rank's heads), the output projection scatters it again."""

    def forward(self, hidden_states, rotary_pos_emb=None, memory: Optional[InfiniMemory] = None, reset=None):
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        # [s, b, heads, d] -> [b, heads, s, d]
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.checkpoint_core_attention and self.training:
            # Selective recompute: keep q, k, v and the memory; recompute the local attention and the
            # memory's reads and writes in backward.
            context, memory = checkpoint(
                self.core_attention,
                query,
                key,
                value,
                memory=memory,
                reset=reset,
                rotary_pos_emb=rotary_pos_emb,
                use_reentrant=False,
            )
        else:
            context, memory = self.core_attention(
                query, key, value, memory=memory, reset=reset, rotary_pos_emb=rotary_pos_emb
            )
        context = context.permute(2, 0, 1, 3).flatten(2)
        output, bias = self.linear_proj(context)
        return output, bias, memory


class InfiniTransformerLayer(TransformerLayer):
    """Pre-norm transformer layer whose attention reads and writes an explicit memory."""

    def forward(self, hidden_states, rotary_pos_emb=None, memory: Optional[InfiniMemory] = None, reset=None):
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        output, bias, memory = self.self_attention(normed, rotary_pos_emb=rotary_pos_emb, memory=memory, reset=reset)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                (output, bias), residual, self.hidden_dropout
            )
        return self._forward_mlp(hidden_states), memory


def get_infini_block_spec(config, vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers and the final norm, which runs in the sequence-parallel region too."""
    layer = get_infini_layer_spec(qk_layernorm=config.qk_layernorm)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage), layer_norm=TorchNorm
    )


def get_infini_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Llama-style layer (RMSNorm, SwiGLU from the config) with Infini-attention, megatron-core local modules."""
    return ModuleSpec(
        module=InfiniTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=InfiniSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=InfiniColumnParallelLinear,
                    core_attention=InfiniCoreAttention,
                    linear_proj=InfiniRowParallelLinear,
                    q_layernorm=TorchNorm if qk_layernorm else IdentityOp,
                    k_layernorm=TorchNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=InfiniColumnParallelLinear, linear_fc2=InfiniRowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
