"""StreamingModel against one call over the whole sequence and an independent float64 reference."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.tolerance import assert_close

SEGMENT, WHOLE_SEGMENTS, TAIL = 8, 6, 5
# tiny_config: 2 layers, the widest sum over the MLP's 96; an error passes through both layers of every segment
# whose memory it reaches.
LAYERS, FFN_HIDDEN = 2, 96
STREAM_DEPTH = LAYERS * (WHOLE_SEGMENTS + 1)
SPLITS = [
    [WHOLE_SEGMENTS * SEGMENT + TAIL],
    [3, 50],
    [1] * (WHOLE_SEGMENTS * SEGMENT + TAIL),
    [5, 11, 2, 30, 5],
    [16, 37],
]
MODELS = {
    "linear, GQA": {},
    "delta, tied embeddings": dict(update="delta", tie_embeddings=True, num_query_groups=4),
    "delta, memory key scale 2.5, query scale 1.5": dict(update="delta", memory_key_scale=2.5, memory_query_scale=1.5),
    "linear, learned memory scales times key scale 2": dict(learned_memory_scales=True, memory_key_scale=2.0),
}


def _state_numel(stream):
    tensors = [t for m in stream.memory for t in m] + [t for c in (stream.cache or []) for t in c]
    return sum(t.numel() for t in tensors)


def worker(rank, world):
    from training.distributed import init_single_process

    init_single_process()
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.streaming import StreamingModel, memory_ablated
    from tests.evals.models import full_state, tiny_config, tiny_model
    from tests.evals.reference_model import reference_logits

    results = {}
    whole = WHOLE_SEGMENTS * SEGMENT
    for name, overrides in MODELS.items():
        overrides = dict(overrides)
        scales = (overrides.pop("memory_key_scale", 1.0), overrides.pop("memory_query_scale", 1.0))
        cfg = tiny_config(segment_length=SEGMENT, **overrides)
        model = tiny_model(cfg, seed=1, infini_memory_key_scale=scales[0], infini_memory_query_scale=scales[1])
        tokens = torch.randint(0, cfg.vocab_size, (2, whole + TAIL), generator=torch.Generator().manual_seed(3))
        with torch.no_grad(), megatron_on_cpu():
            one_call, one_call_memory = model(tokens[:, :whole])
        split_logits = []
        for splits in SPLITS:
            stream = StreamingModel(model, window_segments=2)
            pieces, start = [], 0
            for n in splits:
                pieces.append(stream.feed(tokens[:, start : start + n]))
                start += n
            split_logits.append(torch.cat(pieces, dim=1))

        stream = StreamingModel(model, window_segments=2)
        sizes = []
        for t in range(whole):
            stream.feed(tokens[:, t : t + 1])
            if t in (2 * SEGMENT + 2, 5 * SEGMENT + 2):
                sizes.append(_state_numel(stream))
        token_by_token_memory = stream.memory

        scored = StreamingModel(model, vocab_size=cfg.vocab_size, window_segments=1).score(tokens)
        gate_before = full_state(model)
        with memory_ablated(model):
            ablated_stream = StreamingModel(model, window_segments=4).feed(tokens)
            with torch.no_grad(), megatron_on_cpu():
                per_segment = torch.cat([model(tokens[:, s : s + SEGMENT])[0] for s in range(0, whole, SEGMENT)], dim=1)
            ablated_state = full_state(model)
        results[name] = dict(
            one_call=one_call,
            one_call_memory=one_call_memory,
            split_logits=split_logits,
            token_by_token_memory=token_by_token_memory,
            sizes=sizes,
            scored=scored,
            ablated_stream=ablated_stream,
            per_segment=per_segment,
            reference=reference_logits(gate_before, cfg, tokens, *scales),
            ablated_reference=reference_logits(ablated_state, cfg, tokens, *scales),
            gates_restored=all(torch.equal(gate_before[k], v) for k, v in full_state(model).items()),
            tokens=tokens,
            vocab=cfg.vocab_size,
        )
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, 1)[0]


@pytest.mark.parametrize("name", MODELS)
def test_any_split_of_the_stream_equals_one_call(results, name):
    r = results[name]
    whole = WHOLE_SEGMENTS * SEGMENT
    for splits, logits in zip(SPLITS, r["split_logits"]):
        assert logits.shape == (2, whole + TAIL, r["one_call"].shape[-1])
        assert_close(
            logits[:, :whole], r["one_call"], torch.float32, FFN_HIDDEN, STREAM_DEPTH, what=f"splits {splits[:4]}"
        )


@pytest.mark.parametrize("name", MODELS)
def test_stream_equals_float64_reference_including_the_partial_tail(results, name):
    r = results[name]
    assert r["reference"].abs().max() > 1.0  # logits far from uniform: the comparison has teeth
    for logits in r["split_logits"]:
        assert_close(logits, r["reference"], torch.float32, FFN_HIDDEN, STREAM_DEPTH)


@pytest.mark.parametrize("name", MODELS)
def test_memory_written_from_the_cache_equals_the_models_write(results, name):
    r = results[name]
    for got, want in zip(r["token_by_token_memory"], r["one_call_memory"]):
        # Sums of 48 float32 outer products of the layer's projections, accumulated in another order.
        for g, w in ((got.M, want.M), (got.z, want.z)):
            assert_close(g, w, torch.float32, WHOLE_SEGMENTS * SEGMENT, LAYERS)


@pytest.mark.parametrize("name", MODELS)
def test_state_does_not_grow_with_the_stream(results, name):
    early, late = results[name]["sizes"]
    assert early == late


@pytest.mark.parametrize("name", MODELS)
def test_score_is_the_reference_log_probability_of_the_next_token(results, name):
    r = results[name]
    logprobs = torch.log_softmax(r["reference"][..., : r["vocab"]], dim=-1)
    want = logprobs[:, :-1].gather(-1, r["tokens"][:, 1:, None]).squeeze(-1)
    assert_close(r["scored"], want, torch.float32, FFN_HIDDEN, STREAM_DEPTH)


@pytest.mark.parametrize("name", MODELS)
def test_ablated_memory_sees_one_segment_only(results, name):
    r = results[name]
    whole = WHOLE_SEGMENTS * SEGMENT
    assert_close(r["ablated_stream"][:, :whole], r["per_segment"], torch.float32, FFN_HIDDEN, LAYERS)
    assert_close(r["ablated_stream"], r["ablated_reference"], torch.float32, FFN_HIDDEN, LAYERS)
    # Beyond the first segment the memory changed the output, and the gates came back afterwards.
    assert (r["ablated_stream"][:, SEGMENT:] - r["split_logits"][0][:, SEGMENT:]).abs().max() > 1e-2
    assert r["gates_restored"]


def memory_off_worker(rank, world):
    """A model without the memory streamed in every split, and its float64 reference."""
    from training.distributed import init_single_process

    init_single_process()
    from modeling.streaming import StreamingModel, memory_ablated
    from tests.evals.models import full_state, tiny_config, tiny_model
    from tests.evals.reference_model import reference_logits

    cfg = tiny_config(segment_length=SEGMENT, memory=False)
    model = tiny_model(cfg, seed=1)
    tokens = torch.randint(
        0, cfg.vocab_size, (2, WHOLE_SEGMENTS * SEGMENT + TAIL), generator=torch.Generator().manual_seed(3)
    )
    split_logits, held = [], []
    for splits in SPLITS:
        stream = StreamingModel(model, window_segments=2)
        pieces, start = [], 0
        for n in splits:
            pieces.append(stream.feed(tokens[:, start : start + n]))
            start += n
            held.append(stream.memory)
        split_logits.append(torch.cat(pieces, dim=1))
    try:
        memory_ablated(model)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return dict(
        split_logits=split_logits,
        held=held,
        refusal=refusal,
        reference=reference_logits(full_state(model), cfg, tokens),
        scored=StreamingModel(model, vocab_size=cfg.vocab_size, window_segments=3).score(tokens),
        tokens=tokens,
        vocab=cfg.vocab_size,
    )


def test_a_model_without_memory_streams_as_its_reference_and_carries_nothing():
    r = run_distributed(memory_off_worker, 1)[0]
    assert r["reference"].abs().max() > 1.0
    for logits in r["split_logits"]:
        # Nothing crosses a segment: an error passes through the two layers of its own segment only.
        assert_close(logits, r["reference"], torch.float32, FFN_HIDDEN, LAYERS)
    assert all(memory is None for memory in r["held"])
    logprobs = torch.log_softmax(r["reference"][..., : r["vocab"]], dim=-1)
    assert_close(
        r["scored"],
        logprobs[:, :-1].gather(-1, r["tokens"][:, 1:, None]).squeeze(-1),
        torch.float32,
        FFN_HIDDEN,
        LAYERS,
    )
    assert "no memory to ablate (model.memory=false)" in r["refusal"]
