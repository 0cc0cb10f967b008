"""The megatron-core model under TP=2 and PP=2 (gloo processes) against TP=1/PP=1 from the same weights."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.tolerance import assert_close

SEGMENT, N_SEGMENTS, BATCH, LAYERS, HIDDEN = 8, 3, 2, 4, 64
WINDOWS = 2
# Splitting over TP reorders the sums over the hidden size; the error passes through every layer of both
# windows (memory carries it from the first), forward and backward.
FORWARD_DEPTH = LAYERS * WINDOWS
BACKWARD_DEPTH = 2 * LAYERS * WINDOWS


def model_config():
    from modeling.config import ModelConfig

    return ModelConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=258,
        segment_length=SEGMENT,
        update="delta",
        gate_init=0.3,
    )


def windows():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 258, (BATCH, WINDOWS * N_SEGMENTS * SEGMENT + 1), generator=gen)
    resets = [
        torch.tensor([[True, False, False], [True, False, False]]),
        torch.tensor([[False, False, False], [False, True, False]]),
    ]
    t = N_SEGMENTS * SEGMENT
    return [(tokens[:, i * t : (i + 1) * t], tokens[:, i * t + 1 : (i + 1) * t + 1], resets[i]) for i in range(WINDOWS)]


def worker(rank, world, tp, pp, full_state):
    from megatron.core import parallel_state as ps

    from modeling.config import build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.model import build_model
    from modeling.sharding import full_state_dict, full_tensors, load_full_state_dict
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(tp, pp)
    cfg = model_config()
    vocab = cfg.padded_vocab_size(2)
    torch.manual_seed(0)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = build_model(
        build_transformer_config(cfg, tensor_parallel_size=tp, pipeline_parallel_size=pp),
        vocab,
        pre_process=first,
        post_process=last,
    )
    if full_state is not None:
        load_full_state_dict(model, full_state)
    tp_group = ps.get_tensor_model_parallel_group()

    losses, logits = [], []
    memory = None
    with megatron_on_cpu():
        for ids, labels, reset in windows():
            if first:
                hidden_in = None
            else:
                hidden_in = torch.empty(N_SEGMENTS * SEGMENT, BATCH, HIDDEN)
                dist.recv(hidden_in, ps.get_pipeline_model_parallel_prev_rank())
                hidden_in.requires_grad_()
                model.set_input_tensor(hidden_in)
            out, new_memory = model(ids, labels if last else None, memory, reset)
            if last:
                loss = out.mean()
                loss.backward()
                losses.append(loss.item())
                model.eval()
                with torch.no_grad():
                    logit_shards, _ = model(ids, None, memory, reset)
                model.train()
                gathered = [torch.empty_like(logit_shards) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(gathered, logit_shards.contiguous(), group=tp_group)
                logits.append(torch.cat(gathered, dim=-1))
            else:
                dist.send(out.detach(), ps.get_pipeline_model_parallel_next_rank())
            if not last:
                grad = torch.empty_like(out)
                dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
                out.backward(grad)
            if not first:
                dist.send(hidden_in.grad, ps.get_pipeline_model_parallel_prev_rank())
            memory = [m._replace(M=m.M.detach(), z=m.z.detach()) for m in new_memory]
        grads = full_tensors(model, {n: p.grad for n, p in model.named_parameters()})
        state = full_state_dict(model) if full_state is None else None
    return dict(losses=losses, logits=logits, grads=grads, state=state)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(worker, 1, 1, 1, None)[0]


def assert_grads_close(got, want):
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], torch.float32, HIDDEN, BACKWARD_DEPTH, what=name)


@pytest.mark.slow
def test_tensor_parallel_2_matches_tp1(reference):
    results = run_distributed(worker, 2, 2, 1, reference["state"])
    for r in results:
        assert_close(r["losses"], reference["losses"], torch.float32, HIDDEN, FORWARD_DEPTH)
        for got, want in zip(r["logits"], reference["logits"]):
            assert_close(got, want, torch.float32, HIDDEN, FORWARD_DEPTH)
        assert_grads_close(r["grads"], reference["grads"])


@pytest.mark.slow
def test_pipeline_parallel_2_matches_pp1(reference):
    results = run_distributed(worker, 2, 1, 2, reference["state"])
    last = results[1]
    assert_close(last["losses"], reference["losses"], torch.float32, HIDDEN, FORWARD_DEPTH)
    assert_grads_close(results[0]["grads"], reference["grads"])


def test_reference_run_is_not_trivial(reference):
    assert len(reference["losses"]) == WINDOWS and all(loss > 0 for loss in reference["losses"])
    gates = [g for name, g in reference["grads"].items() if name.endswith("core_attention.gate")]
    assert len(gates) == LAYERS and all(g.abs().sum() > 0 for g in gates)
