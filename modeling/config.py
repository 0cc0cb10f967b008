"""Model configuration: the user-facing schema and its translation into megatron-core's TransformerConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from modeling.memory import UPDATE_RULES


@dataclass
class InfiniTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the Infini-attention knobs."""

    infini_segment_length: int = 2048
    """Tokens per segment: local attention span, and the unit of memory reads and writes."""

    infini_memory: bool = True
    """The compressive memory and its gates; off, each segment is plain causal attention within itself."""

    infini_update: str = "linear"
    """Memory update rule: 'linear' or 'delta'."""

    infini_gate_init: float = 0.0
    """Initial beta of every head's gate (sigmoid(0) = 0.5 mixes memory and local output equally)."""

    infini_loss_chunk_tokens: int = 0
    """Compute the output layer and cross-entropy this many tokens at a time, recomputing the
    logits in backward, so a window's logits never exist whole in fp32 (0: all at once)."""

    infini_compile_loss: bool = False
    """Cross-entropy over the (vocab-parallel) logits in torch.compile'd passes (``modeling.cross_entropy``:
    fused upcast, softmax reductions and gather; the softmax recomputed in backward, never stored in fp32)
    instead of megatron's unfused vocab-parallel one."""

    infini_half_memory_products: bool = False
    """For bf16/fp16 activations, the memory's matmuls take half-precision operands (float32
    accumulation); the memory state stays float32 either way."""

    infini_fused_memory_read: bool = False
    """The memory read and the gate mix as fused Triton kernels (modeling/memory_kernels.py), without the
    float32 per-token intermediates of the eager read; CUDA only, needs Triton."""

    infini_fused_memory_write: bool = False
    """The memory write as fused Triton kernels (modeling/memory_kernels.py), without the float32 copies of
    sigma(k) of the eager write; CUDA only, needs Triton, not with context parallelism."""

    infini_fused_weight_gradients: bool = False
    """The transformer layers' linears sum their weight gradients over microbatches into a ``main_grad``
    inside the weight-gradient GEMM (modeling/weight_gradients.py), once one is attached."""

    infini_learned_memory_scales: bool = False
    """Learn a positive scale per KV head for the memory's keys and per query head for its queries:
    the memory writes sigma(a k) and is read with sigma(b q), a = b = 1 (the paper) at initialisation."""

    infini_memory_key_scale: float = 1.0
    """The memory writes sigma(scale * k) (1: the paper), times the learned key scale if any. An
    inference setting: above 1 it sharpens which tokens a read weighs."""

    infini_memory_query_scale: float = 1.0
    """The memory is read with sigma(scale * q) (1: the paper), times the learned query scale if any.
    An inference setting, as the key scale."""

    def __post_init__(self):
        super().__post_init__()
        if self.infini_update not in UPDATE_RULES:
            raise ValueError(f"infini_update must be one of {UPDATE_RULES}, got {self.infini_update!r}")
        if self.infini_segment_length <= 0:
            raise ValueError(f"infini_segment_length must be positive, got {self.infini_segment_length}")
        if self.infini_learned_memory_scales and not self.infini_memory:
            raise ValueError("infini_learned_memory_scales needs the memory; this config has infini_memory=False")


@dataclass
class ModelConfig:
    """Architecture of a Llama-style Infini-attention model (configs/model/*.yaml)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None means one per attention head."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU width; None gives 8/3 * hidden_size rounded up to a multiple of 64."""
    kv_channels: Optional[int] = None
    vocab_size: int = 258
    make_vocab_size_divisible_by: int = 128
    segment_length: int = 64
    memory: bool = True
    """The compressive memory and its per-head gates. Off: each segment is causal softmax attention within
    itself (RoPE), with no memory, no gates and no state from one segment to the next; a segment as long
    as the window is full causal attention over the window."""
    update: str = "linear"
    gate_init: float = 0.0
    learned_memory_scales: bool = False
    """Learn the memory's read sharpness: per head, sigma(a k) written and sigma(b q) read, with positive
    a (per KV head) and b (per query head) starting at 1, the paper's read; trained at optimizer.gate_lr."""
    rotary_base: int = 10000
    tie_embeddings: bool = False
    qk_layernorm: bool = False
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    recompute: bool = False
    """Recompute each layer's activations in backward (from the same input memory)."""
    recompute_attention: bool = False
    """Selective recompute: only each layer's Infini-attention (local attention, memory reads and
    writes) is recomputed in backward; its inputs q, k, v are kept. Not with `recompute`."""

    def validate(self, where: str = "model") -> None:
        positive = [
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "segment_length",
            "make_vocab_size_divisible_by",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.update not in UPDATE_RULES:
            raise ValueError(f"{where}.update must be one of {UPDATE_RULES}, got {self.update!r}")
        if self.learned_memory_scales and not self.memory:
            raise ValueError(
                f"{where}.learned_memory_scales=true needs the memory, but {where}.memory=false; set one of them"
            )
        if self.recompute and self.recompute_attention:
            raise ValueError(
                f"{where}.recompute (whole layers) and {where}.recompute_attention (attention only) "
                "exclude each other; set one"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"{where}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"{where}.num_query_groups ({groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{where}.hidden_size ({self.hidden_size}) must be divisible by "
                f"{where}.num_attention_heads ({self.num_attention_heads}) unless kv_channels is set"
            )

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return ((8 * self.hidden_size // 3) + 63) // 64 * 64

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Rounded up to make_vocab_size_divisible_by, the same for every TP size (so a checkpoint
        moves between layouts); it must then split evenly over the TP ranks."""
        multiple = self.make_vocab_size_divisible_by
        padded = (self.vocab_size + multiple - 1) // multiple * multiple
        if padded % tensor_parallel_size:
            raise ValueError(
                f"padded vocabulary {padded} (model.make_vocab_size_divisible_by={multiple}) does not "
                f"split over {tensor_parallel_size} tensor-parallel ranks"
            )
        return padded


def build_transformer_config(
    model: ModelConfig,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    use_cpu_initialization: bool = True,
    **overrides,
) -> InfiniTransformerConfig:
    """Llama-style defaults: RMSNorm, SwiGLU, RoPE (set on the GPT model), no biases, no dropout."""
    model.validate()
    fields = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=model.init_method_std,
        qk_layernorm=model.qk_layernorm,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype if not bf16 else torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        infini_segment_length=model.segment_length,
        infini_memory=model.memory,
        infini_update=model.update,
        infini_gate_init=model.gate_init,
        infini_learned_memory_scales=model.learned_memory_scales,
    )
    fields.update(overrides)
    return InfiniTransformerConfig(**fields)
