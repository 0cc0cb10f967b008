"""Parameter count and training FLOPs per token, for MFU.

Convention (as Megatron-LM and PaLM count it): a multiply-add is 2 FLOPs, training is 3x the forward
(forward + backward for activations + backward for weights), attention scores are counted over the
whole causal span without halving. Local attention spans one segment, so its cost per token is
independent of the document length; the memory adds a fixed cost per token (none with ``memory`` off).
"""

from __future__ import annotations

from dataclasses import dataclass

from modeling.config import ModelConfig


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    non_embedding_parameters: int
    flops_per_token: float
    """Training FLOPs (forward + backward) per token."""


def _layer_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, other parameters: norms, gates, learned memory scales) of one layer."""
    h, d = cfg.hidden_size, cfg.head_dim
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    attention = h * (heads * d + 2 * groups * d) + heads * d * h  # qkv, proj
    mlp = 3 * h * cfg.ffn_size  # SwiGLU: gate and up (fc1), down (fc2)
    norms = 2 * h + (2 * d if cfg.qk_layernorm else 0)
    gates = heads if cfg.memory else 0
    scales = groups + heads if cfg.learned_memory_scales else 0
    return attention + mlp, norms + gates + scales


def count_parameters(cfg: ModelConfig, tensor_parallel_size: int = 1) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding and output layer), vocab padded for TP."""
    h = cfg.hidden_size
    body = cfg.num_layers * sum(_layer_parameters(cfg)) + h  # + final norm
    vocab = cfg.padded_vocab_size(tensor_parallel_size)
    embeddings = vocab * h * (1 if cfg.tie_embeddings else 2)
    return body + embeddings, body


def model_cost(cfg: ModelConfig, tensor_parallel_size: int = 1) -> ModelCost:
    """Without the memory (``cfg.memory`` false) no memory reads or writes are counted."""
    total, body = count_parameters(cfg, tensor_parallel_size)
    h, d, n = cfg.hidden_size, cfg.head_dim, cfg.segment_length
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    vocab = cfg.padded_vocab_size(tensor_parallel_size)
    forward = 2 * (cfg.num_layers * _layer_parameters(cfg)[0] + vocab * h)
    forward += cfg.num_layers * 2 * 2 * heads * d * n  # local attention: QK^T and AV over the segment
    if cfg.memory:
        memory_read = heads * (2 * d * d + 2 * d)  # sigma(q) M and sigma(q) z
        memory_write = groups * 2 * d * d * (2 if cfg.update == "delta" else 1)  # sigma(k)^T V (+ delta's retrieval)
        forward += cfg.num_layers * (memory_read + memory_write)
    return ModelCost(total, body, 3.0 * forward)
