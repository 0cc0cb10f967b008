"""Loss by position bucket from the CLI against float64 reference losses, text files and shards."""

import json
import math
import os

import numpy as np
import pytest
import torch

from tests.evals.helpers import LOSS_TOLERANCE, PPL_BUCKETS, SEGMENT, SEGMENT_BINS, TEXTS, exported_reference
from tests.evals.reference_model import reference_logits


def gates_forced_local(state):
    return {k: torch.full_like(v, float("-inf")) if k.endswith("core_attention.gate") else v for k, v in state.items()}


def reference_losses(state, cfg):
    """Per text, the float64 reference's loss of each position 1..n-1 (index i: position i + 1)."""
    out = []
    for text in TEXTS:
        tokens = torch.tensor([list(text.encode())])
        logprobs = torch.log_softmax(reference_logits(state, cfg, tokens)[0, :, : cfg.vocab_size], dim=-1)
        out.append([-logprobs[position - 1, tokens[0, position]].item() for position in range(1, tokens.shape[1])])
    return out


def reference_buckets(state, cfg, edges):
    sums, counts = np.zeros(len(edges) + 1), np.zeros(len(edges) + 1)
    for losses in reference_losses(state, cfg):
        for position, loss in enumerate(losses, start=1):
            bucket = sum(position >= e for e in edges)
            sums[bucket] += loss
            counts[bucket] += 1
    return sums / np.maximum(counts, 1), counts


@pytest.mark.parametrize("source", ["ppl_text", "ppl_shards"])
def test_bucket_losses_equal_the_reference(eval_runs, source):
    cfg, state = exported_reference(os.path.join(eval_runs, "export"))
    ablated = gates_forced_local(state)
    edges = [int(e) for e in PPL_BUCKETS.split(",")]
    with open(os.path.join(eval_runs, source, "perplexity.json")) as f:
        result = json.load(f)
    assert result["documents"] == len(TEXTS)
    buckets = result["buckets"]
    assert [b["bucket"] for b in buckets] == ["[0, 64)", "[64, 128)", "[128, 256)", "[256, end)"]
    for variant, weights in (("memory", state), ("ablated", ablated)):
        want, counts = reference_buckets(weights, cfg, edges)
        assert [b["tokens"] for b in buckets] == counts.astype(int).tolist()
        for b, loss in zip(buckets, want):
            if b["tokens"]:
                assert b[f"loss_{variant}"] == pytest.approx(loss, rel=LOSS_TOLERANCE)
                assert math.log(b[f"ppl_{variant}"]) == pytest.approx(loss, rel=LOSS_TOLERANCE)
    # Past the first segment the memory changes the loss.
    assert buckets[2]["loss_memory"] != pytest.approx(buckets[2]["loss_ablated"], rel=1e-3)
    table = open(os.path.join(eval_runs, source, "perplexity.md")).read()
    assert "| [256, end) |" in table and "ppl, memory ablated" in table


def test_losses_by_position_in_the_segment_equal_the_reference(eval_runs):
    cfg, state = exported_reference(os.path.join(eval_runs, "export"))
    with open(os.path.join(eval_runs, "ppl_text", "perplexity.json")) as f:
        rows = json.load(f)["segment_positions"]
    width = SEGMENT // SEGMENT_BINS
    assert [r["bucket"] for r in rows] == [f"[{i * width}, {(i + 1) * width})" for i in range(SEGMENT_BINS)]
    for variant, weights in (("memory", state), ("ablated", gates_forced_local(state))):
        sums, counts = np.zeros(SEGMENT_BINS), np.zeros(SEGMENT_BINS)
        for losses in reference_losses(weights, cfg):
            for position, loss in enumerate(losses, start=1):
                if position >= SEGMENT:  # the first segment reads an empty memory: left out
                    sums[position % SEGMENT // width] += loss
                    counts[position % SEGMENT // width] += 1
        assert [r["tokens"] for r in rows] == counts.astype(int).tolist()
        for row, loss in zip(rows, sums / counts):
            assert row[f"loss_{variant}"] == pytest.approx(loss, rel=LOSS_TOLERANCE)
    table = open(os.path.join(eval_runs, "ppl_text", "perplexity.md")).read()
    assert f"by position within the segment of {SEGMENT}" in table and f"| [0, {width}) |" in table
    with open(os.path.join(eval_runs, "ppl_shards", "perplexity.json")) as f:
        assert json.load(f)["segment_positions"] == []


def test_a_model_without_memory_is_scored_once_as_its_reference(eval_runs):
    cfg, state = exported_reference(os.path.join(eval_runs, "export_no_memory"))
    assert not cfg.memory and not any(name.endswith("core_attention.gate") for name in state)
    with open(os.path.join(eval_runs, "ppl_no_memory", "perplexity.json")) as f:
        result = json.load(f)
    assert (result["memory"], result["ablation"]) == (False, False)
    want, counts = reference_buckets(state, cfg, [int(e) for e in PPL_BUCKETS.split(",")])
    assert [b["tokens"] for b in result["buckets"]] == counts.astype(int).tolist()
    for b, loss in zip(result["buckets"], want):
        assert "loss_ablated" not in b
        if b["tokens"]:
            assert b["loss_memory"] == pytest.approx(loss, rel=LOSS_TOLERANCE)
    assert "memory ablated" not in open(os.path.join(eval_runs, "ppl_no_memory", "perplexity.md")).read()
