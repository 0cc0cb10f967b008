"""Tiny random models for the evaluation tests (call inside a run_distributed worker)."""

import torch


def tiny_config(**overrides):
    from modeling.config import ModelConfig

    fields = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=258,
        segment_length=8,
        update="linear",
        init_method_std=0.2,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(cfg, seed=0, **config_overrides):
    """A TP=1 model in eval mode with layout-independent random weights and gates (if it has the memory)
    spread over (-2, 2) per head, so that both the memory and the local attention matter; learned memory scales,
    if the model has them, spread over (0.5, 2) per head. config_overrides go to the TransformerConfig
    (e.g. infini_memory_key_scale)."""
    from modeling.config import build_transformer_config
    from modeling.init import init_weights
    from modeling.model import build_model

    model = build_model(
        build_transformer_config(cfg, **config_overrides),
        cfg.padded_vocab_size(),
        tie_embeddings=cfg.tie_embeddings,
        rotary_base=cfg.rotary_base,
    )
    init_weights(model, seed)
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            core = layer.self_attention.core_attention
            if not core.has_memory:
                continue
            core.gate.copy_(torch.linspace(-2.0, 2.0, core.gate.numel()) + 0.5 * i)
            if core.learned_memory_scales:
                for log_scale in (core.memory_key_log_scale, core.memory_query_log_scale):
                    log_scale.copy_(torch.linspace(0.7, -0.7, log_scale.numel()) * (-1) ** i)
    return model.eval()


def full_state(model):
    """A detached copy of the full state dict (the model's own tensors may change later)."""
    from modeling.sharding import full_state_dict

    return {name: tensor.clone() for name, tensor in full_state_dict(model).items()}
