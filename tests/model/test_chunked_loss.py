"""Chunked output layer + cross-entropy (megatron's, or our compiled one) gives the per-token losses and
gradients of megatron's whole-window loss."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.tolerance import assert_close

TOKENS = 2 * 32
# Chunking reorders the sums over tokens (the output layer's gradient) in both passes of each layer.
DEPTH = 2 * 2


def worker(rank, world, chunk, compile_loss=False):
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.init import init_weights
    from modeling.model import build_model
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(1, 1)
    cfg = ModelConfig(num_layers=2, segment_length=8)
    model = build_model(
        build_transformer_config(cfg, infini_loss_chunk_tokens=chunk, infini_compile_loss=compile_loss),
        cfg.padded_vocab_size(),
    )
    init_weights(model, 3)
    ids = torch.randint(0, 258, (2, TOKENS // 2), generator=torch.Generator().manual_seed(0))
    with megatron_on_cpu():
        loss, _ = model(ids, ids.roll(-1, 1), None, None)
        loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def whole_window():
    """Megatron's loss over the whole window, and its gradients."""
    return run_distributed(worker, 1, 0)[0]


def test_chunked_loss_equals_whole_window(whole_window):
    whole_loss, whole_grads = whole_window
    chunk_loss, chunk_grads = run_distributed(worker, 1, 12)[0]
    assert_close(chunk_loss, whole_loss, torch.float32, TOKENS, DEPTH)
    for name, grad in whole_grads.items():
        assert_close(chunk_grads[name], grad, torch.float32, TOKENS, DEPTH, what=name)


def test_compiled_loss_equals_megatron_cross_entropy(whole_window):
    whole_loss, whole_grads = whole_window
    compiled_loss, compiled_grads = run_distributed(worker, 1, 12, True)[0]
    assert_close(compiled_loss, whole_loss, torch.float32, TOKENS, DEPTH)
    for name, grad in whole_grads.items():
        assert_close(compiled_grads[name], grad, torch.float32, TOKENS, DEPTH, what=name)
