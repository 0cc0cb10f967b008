"""The compiled vocab-parallel cross-entropy (modeling.cross_entropy, performance.compile_loss) over TP = 2
gloo ranks against a float64 full-vocabulary cross-entropy in one process: per-token losses, the logits'
gradient, and the model's gradients with plain TP and with sequence parallelism and the chunked loss.
Labels include the first and last id of each rank's share of the vocabulary."""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.tolerance import assert_close

TP = 2
ROWS, LANES, VOCAB = 8, 3, 2 * 96


def boundary_labels(vocab: int, shape) -> torch.Tensor:
    """Random labels [b, t], among them (spread over the lanes and positions) the first and last id of each TP
    rank's share of the vocabulary."""
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    share = vocab // TP
    edges = torch.tensor([i for r in range(TP) for i in (r * share, (r + 1) * share - 1)])
    labels.view(-1)[torch.arange(len(edges)) * (labels.numel() // len(edges))] = edges
    return labels


def logits_and_labels(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(ROWS, LANES, VOCAB, generator=gen, dtype=torch.float64)).to(dtype)
    grad_loss = torch.rand(LANES, ROWS, generator=gen, dtype=torch.float64) + 0.5
    return logits, boundary_labels(VOCAB, (LANES, ROWS)), grad_loss


def function_worker(rank, world, dtype):
    """This rank's vocabulary share of the logits through vocab_parallel_cross_entropy: the losses, the
    share's gradient (from a weighted sum of the losses), and what the forward saved for backward."""
    from megatron.core import parallel_state as ps

    from modeling.cross_entropy import vocab_parallel_cross_entropy
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(world, 1)
    logits, labels, grad_loss = logits_and_labels(dtype)
    share = VOCAB // world
    local = logits[..., rank * share : (rank + 1) * share].clone().requires_grad_()
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = vocab_parallel_cross_entropy(local, labels, ps.get_tensor_model_parallel_group())
    (loss * grad_loss.to(loss.dtype)).sum().backward()
    return loss.detach(), local.grad, saved


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_losses_and_logits_gradient_equal_float64_cross_entropy(dtype):
    logits, labels, grad_loss = logits_and_labels(dtype)
    full = logits.double().requires_grad_()
    want = F.cross_entropy(full.reshape(-1, VOCAB), labels.t().reshape(-1), reduction="none").view(ROWS, LANES).t()
    (want * grad_loss).sum().backward()

    results = run_distributed(function_worker, TP, dtype)
    for loss, _, _ in results:
        # float32 sums over the vocabulary (the upcast of the logits is exact).
        assert_close(loss, want.detach(), torch.float32, VOCAB)
    grad = torch.cat([grad for _, grad, _ in results], dim=-1)
    assert grad.dtype == dtype
    # Computed in float32 (the softmax's sum over the vocabulary), then rounded once to the logits' dtype.
    assert_close(grad, full.grad, *((torch.float32, VOCAB) if dtype == torch.float32 else (dtype, 1)))
    # Only the logits (in their dtype), the labels and one float32 log-sum-exp per token are kept: no
    # float32 softmax.
    per_token = (ROWS, LANES)
    assert results[0][2] == [((*per_token, VOCAB // TP), dtype), (per_token, torch.int64), (per_token, torch.float32)]


SEGMENT, N_SEGMENTS, LAYERS, HIDDEN = 8, 4, 2, 32
WINDOW = SEGMENT * N_SEGMENTS


def model_config():
    from modeling.config import ModelConfig

    return ModelConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        segment_length=SEGMENT,
    )


def model_worker(rank, world, sequence_parallel, chunk):
    """Per-token losses [b, t] and full gradients of the model from init_weights(0) on (ids, labels): with
    world > 1 through the compiled loss, with world 1 as float64 cross-entropy of the model's logits."""
    from modeling.config import build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.init import init_weights
    from modeling.model import build_model
    from modeling.sharding import full_tensors
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(world, 1)
    cfg = model_config()
    vocab = cfg.padded_vocab_size(TP)
    model = build_model(
        build_transformer_config(
            cfg,
            tensor_parallel_size=world,
            sequence_parallel=sequence_parallel,
            infini_loss_chunk_tokens=chunk,
            infini_compile_loss=world > 1,
        ),
        vocab,
    )
    init_weights(model, 0)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (LANES, WINDOW), generator=gen)
    weights = torch.rand(LANES, WINDOW, generator=gen) + 0.5
    labels = boundary_labels(vocab, (LANES, WINDOW))
    with megatron_on_cpu():
        if world > 1:
            loss, _ = model(ids, labels, None, None)
        else:
            logits, _ = model(ids, None, None, None)
            loss = F.cross_entropy(logits.double().reshape(-1, vocab), labels.reshape(-1), reduction="none")
            loss = loss.view(LANES, WINDOW)
        (loss * weights).sum().backward()
        grads = full_tensors(model, {n: p.grad for n, p in model.named_parameters()})
    return loss.detach(), grads


@pytest.fixture(scope="module")
def float64_reference():
    return run_distributed(model_worker, 1, False, 0)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sequence_parallel, chunk", [(False, 0), (True, 12)], ids=["tp2", "tp2-sequence-parallel-chunked"]
)
def test_model_losses_and_gradients_equal_float64_reference(sequence_parallel, chunk, float64_reference):
    want_loss, want_grads = float64_reference
    cfg = model_config()
    vocab = cfg.padded_vocab_size(TP)
    for loss, grads in run_distributed(model_worker, TP, sequence_parallel, chunk):
        # TP reorders the sums over the hidden size in each layer; the loss sums over the vocabulary in
        # float32 instead of float64; the gradients pass through every layer again.
        assert_close(loss, want_loss, torch.float32, vocab, LAYERS + 1)
        assert set(grads) == set(want_grads)
        for name, grad in want_grads.items():
            assert_close(grads[name], grad, torch.float32, vocab, 2 * (LAYERS + 1), what=name)
