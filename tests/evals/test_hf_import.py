"""HF Llama import: a small random transformers LlamaForCausalLM (GQA) built here, no download; our
logits equal its logits at TP=1, TP=2 and PP=2, through the state dict and through the CLI."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.tolerance import tolerance

SEGMENT, SEGMENTS, VOCAB, LAYERS, FFN_HIDDEN = 16, 3, 300, 2, 96
# Two implementations of the same float32 layers, summing in their own orders.
ROUNDING = tolerance(torch.float32, FFN_HIDDEN, LAYERS)
# Inside one segment the memory is empty; the gate at -12 only scales each layer's attention by 1 - sigmoid(-12).
GATE_LEAK = LAYERS * torch.sigmoid(torch.tensor(-12.0)).item()


def hf_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11 + tie)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=FFN_HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Per tie setting: state dict, config, a save_pretrained directory, inputs and HF logits per segment."""
    out = {}
    tokens = torch.randint(0, VOCAB, (2, SEGMENT * SEGMENTS), generator=torch.Generator().manual_seed(0))
    for tie in (False, True):
        model = hf_llama(tie)
        path = tmp_path_factory.mktemp(f"llama_tie{tie}")
        model.save_pretrained(path)
        with torch.no_grad():
            # Our local attention restarts at each segment: HF on each segment alone is the target.
            logits = torch.cat(
                [model(tokens[:, s : s + SEGMENT]).logits for s in range(0, tokens.shape[1], SEGMENT)], 1
            )
        out[tie] = dict(
            state={k: v.clone() for k, v in model.state_dict().items()},
            config=model.config.to_dict(),
            path=str(path),
            tokens=tokens,
            logits=logits,
        )
    return out


def _forward_all_stages(model, tokens):
    """Logits [b, t, vocab] gathered over TP on the last stage (None elsewhere); PP hands hidden states on."""
    from megatron.core import parallel_state as ps

    from modeling.cpu_compat import megatron_on_cpu

    with torch.no_grad(), megatron_on_cpu():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out, _ = model(tokens)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
    shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _imported(case, tp, pp, learned_memory_scales=False):
    """Our model from the HF state dict on this rank's TP/PP shard, and its logits three ways."""
    from megatron.core import parallel_state as ps

    from modeling.config import build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.hf_import import llama_to_infini
    from modeling.model import build_model
    from modeling.sharding import load_full_state_dict
    from modeling.streaming import memory_ablated

    cfg, state = llama_to_infini(
        case["state"], case["config"], segment_length=SEGMENT, learned_memory_scales=learned_memory_scales
    )
    with megatron_on_cpu():  # tied embeddings over pipeline stages are synchronised at construction
        model = build_model(
            build_transformer_config(cfg, tensor_parallel_size=tp, pipeline_parallel_size=pp),
            cfg.padded_vocab_size(tp),
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            tie_embeddings=cfg.tie_embeddings,
            rotary_base=cfg.rotary_base,
        ).eval()
    load_full_state_dict(model, state)
    one_segment = _forward_all_stages(model, case["tokens"][:, :SEGMENT])
    gated = _forward_all_stages(model, case["tokens"])
    with memory_ablated(model):
        ablated = _forward_all_stages(model, case["tokens"])
    return dict(cfg=cfg, one_segment=one_segment, gated=gated, ablated=ablated)


def parallel_worker(rank, world, tp, pp, case, learned_memory_scales=False):
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(tp, pp)
    return _imported(case, tp, pp, learned_memory_scales)


def single_worker(rank, world, cases, export_dir):
    """Both tie settings from the state dict, then the CLI's export of the untied one, without and with
    learned memory scales and without the memory: logits over every segment (the memory read) and the
    exported state."""
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.export import load_exported, read_export
    from modeling.hf_import import main
    from training.distributed import init_single_process

    init_single_process()
    results = {tie: _imported(case, 1, 1) for tie, case in cases.items()}
    for run, flags in (
        ("cli", []),
        ("cli_learned_scales", ["--learned-memory-scales"]),
        ("cli_no_memory", ["--no-memory"]),
    ):
        out = f"{export_dir}_{run}"
        assert main(["--hf-dir", cases[False]["path"], "--out", out, "--segment-length", str(SEGMENT)] + flags) == 0
        model, cfg = load_exported(out)
        with torch.no_grad(), megatron_on_cpu():
            logits, _ = model(cases[False]["tokens"])
        results[run] = dict(cfg=cfg, logits=logits, state=read_export(out)[1])
    return results


@pytest.fixture(scope="module")
def single(llamas, tmp_path_factory):
    return run_distributed(single_worker, 1, llamas, str(tmp_path_factory.mktemp("import") / "export"))[0]


def _check(result, case):
    want = case["logits"]
    assert want.abs().max() > 1.0
    cfg = result["cfg"]
    assert (cfg.gate_init, cfg.rotary_base, cfg.norm_epsilon, cfg.query_groups) == (-12.0, 500000, 1e-5, 2)
    scale = want.abs().max().item()
    one_segment = ROUNDING + GATE_LEAK
    torch.testing.assert_close(
        result["one_segment"][..., :VOCAB], want[:, :SEGMENT], rtol=one_segment, atol=one_segment * scale
    )
    # Gates forced local: every segment is the original model on that segment alone.
    torch.testing.assert_close(result["ablated"][..., :VOCAB], want, rtol=ROUNDING, atol=ROUNDING * scale)
    # Gates at their initial -12: the memory barely moves the output.
    torch.testing.assert_close(result["gated"], result["ablated"], rtol=0, atol=1e-3)
    assert result["one_segment"].shape[-1] == cfg.padded_vocab_size() == 384
    assert (result["one_segment"][..., VOCAB:] == 0).all()


@pytest.mark.parametrize("tie", [False, True])
def test_import_at_tp1_gives_the_original_logits(llamas, single, tie):
    _check(single[tie], llamas[tie])


@pytest.mark.slow
def test_import_at_tp2_gives_the_original_logits(llamas):
    # With learned memory scales: they split over the ranks' heads, at 1 they read as the paper.
    for result in run_distributed(parallel_worker, 2, 2, 1, llamas[False], True):
        assert result["cfg"].learned_memory_scales
        _check(result, llamas[False])


@pytest.mark.slow
def test_import_at_pp2_gives_the_original_logits(llamas):
    last = run_distributed(parallel_worker, 2, 1, 2, llamas[True])[1]
    _check(last, llamas[True])


def test_cli_writes_an_export_that_loads_as_the_original(llamas, single):
    result = single["cli"]
    assert result["cfg"].segment_length == SEGMENT and not result["cfg"].learned_memory_scales
    assert not any("log_scale" in name for name in result["state"])
    want = llamas[False]["logits"][:, :SEGMENT]
    bound = ROUNDING + GATE_LEAK
    torch.testing.assert_close(
        result["logits"][:, :SEGMENT, :VOCAB], want, rtol=bound, atol=bound * want.abs().max().item()
    )


def test_cli_with_learned_memory_scales_starts_them_at_one(single):
    plain, learned = single["cli"], single["cli_learned_scales"]
    assert learned["cfg"].learned_memory_scales
    scales = {name: t for name, t in learned["state"].items() if "log_scale" in name}
    assert sorted(scales) == sorted(
        f"decoder.layers.{i}.self_attention.core_attention.memory_{kind}_log_scale"
        for i in range(2)
        for kind in ("key", "query")
    )
    for name, log_scale in scales.items():
        assert log_scale.shape == ((2,) if "key" in name else (4,))
        assert torch.equal(log_scale, torch.zeros_like(log_scale)), name
    assert learned["state"].keys() - scales.keys() == plain["state"].keys()
    # Scales of 1 are the paper's read exactly: the same logits, memory read included, bit for bit.
    assert torch.equal(learned["logits"], plain["logits"])


def test_cli_without_memory_is_the_original_on_each_segment(llamas, single):
    result = single["cli_no_memory"]
    assert not result["cfg"].memory
    assert not any("core_attention" in name for name in result["state"])
    # No gate to leak through: every segment is the original on that segment alone, to rounding.
    want = llamas[False]["logits"]
    torch.testing.assert_close(
        result["logits"][..., :VOCAB], want, rtol=ROUNDING, atol=ROUNDING * want.abs().max().item()
    )


def test_unsupported_checkpoints_fail_clearly(llamas):
    from modeling.hf_import import llama_to_infini

    case = llamas[False]
    for change, message in (
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "RoPE type"),
        ({"attention_bias": True}, "biases"),
        ({"model_type": "gpt2"}, "only Llama"),
    ):
        with pytest.raises(ValueError, match=message):
            llama_to_infini(case["state"], {**case["config"], **change})
