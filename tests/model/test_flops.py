import pytest

from modeling.config import ModelConfig
from modeling.flops import count_parameters, model_cost
from tests.distributed import run_distributed

CONFIGS = [
    ModelConfig(),
    ModelConfig(
        num_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_query_groups=2,
        qk_layernorm=True,
        tie_embeddings=True,
        vocab_size=1000,
        update="delta",
    ),
    ModelConfig(num_query_groups=2, learned_memory_scales=True),
    ModelConfig(num_query_groups=2, memory=False, qk_layernorm=True),
]


def count_model(rank, world, cfg):
    from modeling.config import build_transformer_config
    from modeling.model import build_model
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(1, 1)
    model = build_model(build_transformer_config(cfg), cfg.padded_vocab_size(), tie_embeddings=cfg.tie_embeddings)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg", CONFIGS)
def test_parameter_count_matches_the_built_model(cfg):
    assert count_parameters(cfg)[0] == run_distributed(count_model, 1, cfg)[0]


def test_flops_follow_the_6N_plus_attention_convention_plus_memory():
    cfg = ModelConfig(
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=16,
        ffn_hidden_size=5504,
        vocab_size=32000,
        segment_length=2048,
    )
    total, _ = count_parameters(cfg)
    embedding = cfg.padded_vocab_size() * cfg.hidden_size
    norms_and_gates = cfg.num_layers * (2 * cfg.hidden_size + 16) + cfg.hidden_size  # no matmuls
    dense = 6 * (total - embedding - norms_and_gates) + 12 * cfg.num_layers * cfg.hidden_size * cfg.segment_length
    memory = 3 * cfg.num_layers * (16 * (2 * 128 * 128 + 2 * 128) + 16 * 2 * 128 * 128)
    assert model_cost(cfg).flops_per_token == pytest.approx(dense + memory, rel=1e-9)
    assert 1.30e9 < total < 1.40e9
