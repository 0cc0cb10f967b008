"""experiments/memory_read_share.py sees q and k as the memory does: with each head's learned scale."""

import os
import sys

import numpy as np
import torch

from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def captured_worker(rank, world):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from memory_read_share import capture_attention_inputs

    from modeling import layers
    from tests.evals.models import tiny_config, tiny_model
    from training.distributed import init_single_process

    init_single_process()
    model = tiny_model(tiny_config(learned_memory_scales=True), seed=3)
    ids = np.arange(32) % 200
    raw = []
    forward = layers.InfiniCoreAttention.forward

    def recording(self, query, key, value, **kwargs):
        raw.append((query[0].detach().double(), key[0].detach().double()))
        return forward(self, query, key, value, **kwargs)

    layers.InfiniCoreAttention.forward = recording
    try:
        captured = capture_attention_inputs(model, ids)
    finally:
        layers.InfiniCoreAttention.forward = forward
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    return [
        (q, k, rq, rk, core.memory_query_log_scale.detach().double(), core.memory_key_log_scale.detach().double())
        for (q, k, _), (rq, rk), core in zip(captured, raw, cores)
    ]


def test_queries_and_keys_carry_each_heads_learned_scale():
    for q, k, raw_q, raw_k, query_log_scale, key_log_scale in run_distributed(captured_worker, 1)[0]:
        assert query_log_scale.abs().max() > 0.5  # the scales are not 1
        torch.testing.assert_close(q, raw_q * query_log_scale.exp().view(-1, 1, 1))
        torch.testing.assert_close(k, raw_k * key_log_scale.exp().view(-1, 1, 1))
