"""Passkey prompts, answers, training data, and the CLI against an independent float64 greedy decode."""

import json
import os
import re

import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import ByteTokenizer
from evals.passkey import (
    FILLER,
    HEADER,
    NEAR_BYTES,
    NEEDLE,
    QUESTION,
    format_length,
    make_data,
    make_documents,
    make_prompt,
    parse_length,
    read_answer,
)
from tests.evals.helpers import ABLATED_HEADS, KEY_SCALE, LOSS_TOLERANCE, QUERY_SCALE, exported_reference
from tests.tolerance import tolerance


def text_of(ids):
    return np.asarray(ids, dtype=np.uint8).tobytes().decode("ascii")


def test_lengths_parse_and_print():
    assert [parse_length(x) for x in ("4096", "4k", "1M", " 32K ")] == [4096, 4096, 1 << 20, 32768]
    assert [format_length(n) for n in (1024, 1 << 20, 1000, 0)] == ["1K", "1M", "1000", "0"]
    with pytest.raises(ValueError):
        parse_length("4 kb")


@pytest.mark.parametrize("length", [300, 1000, 4096])
def test_prompt_has_the_papers_format_at_the_exact_length(length):
    needle = NEEDLE.format(key="40213")
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        text = text_of(make_prompt(ByteTokenizer(), length, depth, "40213"))
        assert len(text) == length
        assert text.startswith(HEADER) and text.endswith(QUESTION) and text.count(needle) == 1
        assert text.count("40213") == 2
        at = text.index(needle)
        filler = text[len(HEADER) : at] + text[at + len(needle) : -len(QUESTION)]
        assert filler == (FILLER * (len(filler) // len(FILLER) + 1))[: len(filler)]
        # The needle starts a sentence of the filler, or ends the filler.
        assert text[len(HEADER) : at] == "" or text[:at].endswith(".") or at + len(needle) == length - len(QUESTION)
        positions.append((at - len(HEADER)) / len(filler))
    assert positions[0] == 0.0 and positions[-1] == 1.0
    assert positions == sorted(positions)
    assert all(abs(p - d) <= 30 / len(filler) for p, d in zip(positions, (0.0, 0.25, 0.5, 0.75, 1.0)))


def test_prompt_shorter_than_its_fixed_parts_is_refused():
    with pytest.raises(ValueError, match="at least"):
        make_prompt(ByteTokenizer(), 100, 0.5, "12345")


def test_answers_must_start_with_the_key():
    assert read_answer(" 40213.") == "40213"
    assert read_answer("40213") == "40213"
    assert read_answer(" 402135") == "402135"
    assert read_answer(" key 40213") is None
    assert read_answer("") is None


def test_make_data_writes_documents_within_the_length_bounds(tmp_path):
    summary = make_data(str(tmp_path), n_docs=40, max_len=1024, min_len=400, seed=3)
    assert summary["documents"] == 40
    with open(tmp_path / "passkey.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    lengths = np.load(tmp_path / "shards" / "doc_tokens.npy")
    assert lengths.tolist() == [len(d) for d in docs]
    assert lengths.min() >= 400 and lengths.max() <= 1023  # + the reader's <eos> <= 1024
    for doc in docs:
        key = doc[-6:-1]
        assert doc.endswith(f"{QUESTION} {key}.") and NEEDLE.format(key=key) in doc
    assert len({d[-6:-1] for d in docs}) > 30
    with pytest.raises(ValueError):
        make_data(str(tmp_path / "bad"), n_docs=1, max_len=1024, min_len=100, seed=0)


def test_make_data_without_header_starts_in_the_filler_and_can_be_shorter(tmp_path):
    text = text_of(make_prompt(ByteTokenizer(), 120, 0.0, "40213", header=False))
    assert len(text) == 120 and text.startswith(NEEDLE.format(key="40213")) and text.endswith(QUESTION)
    make_data(str(tmp_path), n_docs=20, max_len=300, min_len=150, seed=4, questions=2, header=False)
    with open(tmp_path / "passkey.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert all(HEADER not in d and 150 <= len(d) < 300 and d.count(QUESTION) == 2 for d in docs)
    with pytest.raises(ValueError, match="min-len"):
        make_data(str(tmp_path / "bad"), n_docs=1, max_len=300, min_len=150, seed=0, questions=2)


def test_make_data_distractors_are_other_numbers_outside_the_needle_and_never_weighted(tmp_path):
    make_data(
        str(tmp_path),
        n_docs=30,
        max_len=400,
        min_len=250,
        seed=5,
        questions=2,
        answer_weight=20,
        header=False,
        distractors=3,
    )
    with open(tmp_path / "passkey.jsonl") as f:
        docs = [json.loads(line) for line in f]
    for doc in docs:
        text, key = doc["text"], doc["text"][-6:-1]
        numbers = re.findall(r" The room number is (\d{5})\.", text)
        assert len(numbers) == 3 and key not in numbers and 250 <= len(text) < 400
        assert NEEDLE.format(key=key) in text and text.count(QUESTION + f" {key}.") == 2
        # Only the answers' key digits weigh 20; distractor digits are ordinary tokens.
        weighted = "".join(text[start:end] for start, end, _ in doc["loss_weights"])
        assert weighted == key * 2
    with pytest.raises(ValueError, match="distractors"):
        make_data(str(tmp_path / "bad"), n_docs=1, max_len=400, min_len=250, seed=0, distractors=-1)


def assert_reference_greedy(state, cfg, prompt, continuation, scales=(1.0, 1.0)):
    """Each continuation token is the float64 reference's argmax given the prompt and the tokens before it."""
    from tests.evals.reference_model import reference_logits

    seq = torch.as_tensor(np.concatenate([prompt, continuation]), dtype=torch.long)[None]
    logits = reference_logits(state, cfg, seq, *scales)[0, len(prompt) - 1 : -1, : cfg.vocab_size]
    assert logits.argmax(-1).tolist() == list(continuation)


def test_make_data_can_ask_several_times_after_the_needle(tmp_path):
    make_data(str(tmp_path), n_docs=30, max_len=2048, min_len=800, seed=4, questions=3)
    with open(tmp_path / "passkey.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    for doc in docs:
        key = doc[-6:-1]
        qa = f"{QUESTION} {key}."
        assert 800 <= len(doc) < 2048 and doc.endswith(qa) and doc.count(qa) == 3
        assert doc.count(QUESTION) == 3 and doc.index(qa) > doc.index(NEEDLE.format(key=key))
        # With the questions taken out, what is left is a one-question passkey prompt.
        assert (doc.replace(qa, "", 2)[: -len(f" {key}.")]).endswith(QUESTION)
    with pytest.raises(ValueError, match="min-len"):
        make_data(str(tmp_path / "bad"), n_docs=1, max_len=2048, min_len=300, seed=0, questions=3)


def filler_before_first_question(doc: str) -> int:
    """Bytes between the end of the needle and the first question."""
    key = doc[-6:-1]
    needle_end = doc.index(NEEDLE.format(key=key)) + len(NEEDLE.format(key=key))
    return doc.index(QUESTION, needle_end) - needle_end


def test_make_data_near_asks_right_after_the_needle_in_that_share_of_documents(tmp_path):
    args = dict(n_docs=200, min_len=4096, max_len=16384, seed=5, questions=2, header=False)
    spread = [filler_before_first_question(d) for d in make_documents(**args)]
    near = [filler_before_first_question(d) for d in make_documents(**args, near=1.0)]
    half = [filler_before_first_question(d) for d in make_documents(**args, near=0.5)]
    assert all(gap < NEAR_BYTES for gap in near)
    # Without it, a question lands that close mostly where little filler follows the needle; with a
    # share of 0.5, half the documents are near on top of those.
    by_chance = np.mean(np.array(spread) < NEAR_BYTES)
    assert by_chance < 0.3
    assert abs(np.mean(np.array(half) < NEAR_BYTES) - (0.5 + 0.5 * by_chance)) < 0.12
    # Asked for as 0, no random number is drawn for it: the recipes' documents stay as they were.
    assert make_documents(**args, near=0.0) == make_documents(**args)
    for bad in (dict(near=1.5), dict(near=0.5, questions=1)):
        with pytest.raises(ValueError, match="--near"):
            make_data(str(tmp_path / "bad"), **{**args, "n_docs": 1, **bad})


def test_make_data_answer_weight_weighs_exactly_the_answers_key_digits(tmp_path):
    from data_pipeline import DataConfig, SourceConfig, build_train_loader
    from tests.data.helpers import lane_documents_with_weights, run_until_epoch

    make_data(str(tmp_path / "w"), n_docs=6, max_len=2048, min_len=800, seed=5, questions=3, answer_weight=10)
    with open(tmp_path / "w" / "passkey.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    want = {}
    for doc in docs:
        key = doc[-6:-1]
        qa = f"{QUESTION} {key}."
        # The key's bytes after each question, as label positions: position i predicts byte i + 1.
        digits = {at + len(QUESTION) + 1 + j for at in range(len(doc)) if doc.startswith(qa, at) for j in range(5)}
        assert len(digits) == 15
        want[tuple(doc.encode("ascii"))] = [10.0 if i + 1 in digits else 1.0 for i in range(len(doc))]
    cfg = DataConfig(
        sources=[SourceConfig(str(tmp_path / "w" / "shards"))],
        global_lanes=2,
        segment_length=256,
        n_segments=8,
        num_workers=0,
        shuffle_buffer=1,
    )
    batches = run_until_epoch([build_train_loader(cfg, 0, 1)], 1)
    seen = set()
    for lane in range(2):
        for doc in lane_documents_with_weights(batches, lane):
            assert doc["weights"] == want[doc["tokens"]]
            seen.add(doc["tokens"])
    assert seen == set(want)

    make_data(str(tmp_path / "plain"), n_docs=6, max_len=2048, min_len=800, seed=5, questions=3)
    with open(tmp_path / "plain" / "passkey.jsonl") as f:
        assert [json.loads(line) for line in f] == [{"text": doc} for doc in docs]
    with open(tmp_path / "plain" / "shards" / "index.json") as f:
        assert "weighted_documents" not in json.load(f)
    with pytest.raises(ValueError, match="answer-weight"):
        make_data(str(tmp_path / "bad"), n_docs=1, max_len=2048, min_len=800, seed=0, answer_weight=-1)


def reference_answer_nll(state, cfg, prompt, answer, scales=(1.0, 1.0)):
    """Teacher-forced negative log-likelihood (nats) of the answer tokens after the prompt."""
    from tests.evals.reference_model import reference_logits

    seq = torch.as_tensor(np.concatenate([prompt, answer]), dtype=torch.long)[None]
    logits = reference_logits(state, cfg, seq, *scales)[0, len(prompt) - 1 : -1, : cfg.vocab_size]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, torch.as_tensor(answer, dtype=torch.long)[:, None])
    return -logprobs.sum().item()


@pytest.mark.slow  # a float64 greedy decode of every trial
@pytest.mark.parametrize("run", ["passkey", "ablated", "no_header", "heads", "key_scale"])
def test_cli_scores_the_reference_greedy_continuation(eval_runs, run):
    cfg, state = exported_reference(os.path.join(eval_runs, "export"))
    scales = (KEY_SCALE, QUERY_SCALE) if run == "key_scale" else (1.0, 1.0)
    if run == "ablated":
        state = {
            k: torch.full_like(v, float("-inf")) if k.endswith("core_attention.gate") else v for k, v in state.items()
        }
    if run == "heads":
        state = dict(state)
        for layer, head in ABLATED_HEADS:
            gate = f"decoder.layers.{layer}.self_attention.core_attention.gate"
            state[gate] = state[gate].clone()
            state[gate][head] = float("-inf")
    with open(os.path.join(eval_runs, run, "passkey.json")) as f:
        result = json.load(f)
    assert result["lengths"] == [256, 320] and result["depths"] == [0, 50, 100] and result["trials"] == 2
    assert result["ablate_memory"] == (run == "ablated") and result["header"] == (run != "no_header")
    assert result["ablate_heads"] == ([list(h) for h in ABLATED_HEADS] if run == "heads" else [])
    assert (result["memory_key_scale"], result["memory_query_scale"]) == scales
    assert len(result["rows"]) == 12
    for row in result["rows"]:
        # The prompt and the decoded " NNNNN" plus one token make the trial's length.
        assert len(row["output_ids"]) == 7
        prompt = make_prompt(ByteTokenizer(), row["length"] - 7, row["depth"] / 100, row["key"], run != "no_header")
        assert_reference_greedy(state, cfg, prompt, row["output_ids"], scales)
        assert row["output"] == bytes(t for t in row["output_ids"] if t < 256).decode("utf-8", errors="replace")
        answer = np.frombuffer(f" {row['key']}".encode(), dtype=np.uint8)
        assert row["answer_nll"] == pytest.approx(
            reference_answer_nll(state, cfg, prompt, answer, scales) / 5, rel=LOSS_TOLERANCE
        )
        assert row["correct"] == (read_answer(row["output"]) == row["key"])
    for length in ("256", "320"):
        for depth in ("0", "50", "100"):
            rows = [r for r in result["rows"] if str(r["length"]) == length and f"{r['depth']:g}" == depth]
            assert result["accuracy"][length][depth] == np.mean([r["correct"] for r in rows])
            assert result["answer_nll"][length][depth] == pytest.approx(np.mean([r["answer_nll"] for r in rows]))
    table = open(os.path.join(eval_runs, run, "passkey.md")).read()
    # Accuracy and answer loss: header, rule, 3 depths and the mean each.
    assert table.count("| depth \\ length | 256 | 320 |") == 2 and table.count("\n|") == 12
    with open(os.path.join(eval_runs, run, "passkey_heatmap.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_half_memory_products_evaluate_in_bf16_close_to_float32(eval_runs):
    runs = {}
    for run in ("passkey", "bf16", "half"):
        with open(os.path.join(eval_runs, run, "passkey.json")) as f:
            runs[run] = json.load(f)["rows"]
    assert [(r["length"], r["depth"], r["key"]) for r in runs["half"]] == [
        (r["length"], r["depth"], r["key"]) for r in runs["passkey"]
    ]
    half, bf16, full = (np.array([r["answer_nll"] for r in runs[run]]) for run in ("half", "bf16", "passkey"))
    # The flag reaches the memory: its products round differently from bf16 weights alone.
    assert not np.array_equal(half, bf16)
    # bf16 rounds each layer's input and, with bf16 products, each layer's memory product: 2 layers.
    np.testing.assert_allclose(half, full, rtol=tolerance(torch.bfloat16, 1, depth=4))
    assert not os.path.exists(os.path.join(eval_runs, "refused"))


def test_ablated_runs_see_the_same_prompts(eval_runs):
    rows, nll = {}, {}
    for run in ("passkey", "ablated", "heads", "key_scale"):
        with open(os.path.join(eval_runs, run, "passkey.json")) as f:
            result = json.load(f)["rows"]
        rows[run] = [(r["length"], r["depth"], r["trial"], r["key"]) for r in result]
        nll[run] = np.array([r["answer_nll"] for r in result])
    assert rows["passkey"] == rows["ablated"] == rows["heads"] == rows["key_scale"]
    # The scales reach the memory: past the first segment the answers' loss changes.
    assert np.abs(nll["key_scale"] - nll["passkey"]).max() > 1e-3
    # Two heads forced local change the answers' loss, and less than all of them do.
    assert np.abs(nll["heads"] - nll["passkey"]).max() > 1e-3 and np.abs(nll["heads"] - nll["ablated"]).max() > 1e-3
    assert not os.path.exists(os.path.join(eval_runs, "refused"))
