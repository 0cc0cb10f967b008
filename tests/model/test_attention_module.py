"""The megatron-core attention module against the float64 reference built from its own weights by hand."""

import math

import torch

from tests.distributed import run_distributed
from tests.model.reference import reference_infini_attention
from tests.tolerance import assert_close

S, B, HIDDEN, HEADS, GROUPS, SEGMENT = 12, 2, 32, 4, 2, 4


def one_layer_model():
    """The one-layer model of these tests, in a single-process world."""
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.model import build_model
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(1, 1)
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        segment_length=SEGMENT,
        update="linear",
    )
    return build_model(build_transformer_config(cfg), cfg.padded_vocab_size())


def worker(rank, world):
    from modeling.cpu_compat import megatron_on_cpu

    model = one_layer_model()
    attention = model.decoder.layers[0].self_attention
    with torch.no_grad():
        attention.core_attention.gate.copy_(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
    x = torch.randn(S, B, HIDDEN)
    memory = (torch.randn(B, GROUPS, HIDDEN // HEADS, HIDDEN // HEADS), torch.rand(B, GROUPS, HIDDEN // HEADS) + 0.5)
    reset = torch.tensor([[False, True, False], [False, False, False]])
    with megatron_on_cpu(), torch.no_grad():
        rotary = model.rotary_pos_emb(SEGMENT)
        out, bias, new_memory = attention(x, rotary_pos_emb=rotary, memory=memory, reset=reset)
    return dict(
        x=x,
        out=out,
        M=new_memory.M,
        memory=memory,
        reset=reset,
        rotary=rotary,
        qkv=attention.linear_qkv.weight.detach().clone(),
        proj=attention.linear_proj.weight.detach().clone(),
        gate=attention.core_attention.gate.detach().clone(),
    )


def test_attention_module_matches_hand_built_reference():
    r = run_distributed(worker, 1)[0]
    d = HIDDEN // HEADS
    per_group = HEADS // GROUPS
    # megatron's fused QKV rows: for each KV group, its query heads, then its key, then its value.
    w = r["qkv"].double().view(GROUPS, (per_group + 2) * d, HIDDEN)
    wq = w[:, : per_group * d].reshape(HEADS * d, HIDDEN)
    wk = w[:, per_group * d : (per_group + 1) * d].reshape(GROUPS * d, HIDDEN)
    wv = w[:, (per_group + 1) * d :].reshape(GROUPS * d, HIDDEN)
    x = r["x"].double().transpose(0, 1)  # [b, s, h]
    q = (x @ wq.T).view(B, S, HEADS, d).transpose(1, 2)
    k = (x @ wk.T).view(B, S, GROUPS, d).transpose(1, 2)
    v = (x @ wv.T).view(B, S, GROUPS, d).transpose(1, 2)
    ref, (ref_M, _) = reference_infini_attention(
        q,
        k,
        v,
        r["gate"],
        r["memory"],
        segment_length=SEGMENT,
        update="linear",
        reset=r["reset"],
        rotary_pos_emb=r["rotary"],
    )
    ref_out = ref.transpose(1, 2).reshape(B, S, HEADS * d) @ r["proj"].double().T
    # float32 against float64: the QKV projection, attention and memory, the output projection.
    assert_close(r["out"], ref_out.transpose(0, 1), torch.float32, max(HIDDEN, S), depth=3)
    # The memory: S tokens' projected keys and values summed into it.
    assert_close(r["M"], ref_M, torch.float32, max(HIDDEN, S), depth=2)
    assert math.isfinite(r["out"].abs().sum().item())


def layer_graphs_worker(rank, world):
    from modeling.cpu_compat import megatron_on_cpu

    model = one_layer_model()
    with megatron_on_cpu():
        rotary = model.rotary_pos_emb(SEGMENT)
        explained = torch._dynamo.explain(model.decoder.layers[0].forward)(
            torch.randn(S, B, HIDDEN), rotary_pos_emb=rotary
        )
    return explained.graph_count, [reason.reason for reason in explained.break_reasons]


def test_a_compiled_layer_is_one_graph():
    # Without tensor parallelism torch.compile (performance.compile_layers) makes each layer one graph: a
    # graph break would leave the matmuls' neighbours unfused and add a resume frame, with its guards, to
    # every call. (TP's asynchronous all-reduces still split it.)
    assert run_distributed(layer_graphs_worker, 1)[0] == (1, [])
