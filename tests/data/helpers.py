"""Test helpers: a synthetic corpus whose raw token lists are the reference, and an independent
checker of the batch layout (it reconstructs documents from batches by itself)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Dict, List, Sequence

import numpy as np
import torch

from data_pipeline import BYTES_EOS_ID, BYTES_PAD_ID

_WORDS = ["lane", "segment", "memory", "token", "shard", "résumé", "naïve", "漢字", "🙂", "def", "return", "\n", "  "]


def make_texts(n: int, seed: int, long_every: int = 7) -> List[str]:
    """Documents from a few bytes to several windows long, with multi-byte characters, all distinct."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        n_words = int(rng.integers(1, 8)) if i % 5 == 0 else int(rng.integers(20, 120))
        if i % long_every == 0:
            n_words = int(rng.integers(300, 700))
        words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), n_words)]
        texts.append(f"{i}:" + " ".join(words))
    return texts


def byte_ids(text: str) -> tuple:
    return tuple(text.encode("utf-8"))


def write_jsonl(path: str, texts: Sequence[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def lane_documents(batches: Sequence[Dict], lane: int, eos=BYTES_EOS_ID, pad=BYTES_PAD_ID) -> List[dict]:
    """Split one lane's stream (consecutive batches) into documents, asserting the layout:
    documents start on a segment boundary exactly where reset is set; labels are the next token of
    the same document; the loss mask is 1 except on each document's last token (<eos>) and padding;
    padding fills the rest of a document's last segment. Returns [{tokens (without <eos>), epoch,
    source}] in stream order; a document still running at the end is left out."""
    docs: List[dict] = []
    cur = None
    expect_next = None
    for b in batches:
        row = b["lane_ids"].tolist().index(lane)
        tok, lab = b["tokens"][row].tolist(), b["labels"][row].tolist()
        msk, rst = b["loss_mask"][row].tolist(), b["reset"][row].tolist()
        ep, src = b["epoch"][row].tolist(), b["source"][row].tolist()
        seg_len = len(tok) // len(rst)
        for s in range(len(rst)):
            if rst[s]:
                assert cur is None, f"lane {lane}: reset while a document is still running"
                cur, expect_next = {"tokens": [], "epoch": ep[s], "source": src[s]}, None
            elif cur is not None:
                assert (ep[s], src[s]) == (cur["epoch"], cur["source"]), "segment tags change inside a document"
            else:
                assert (ep[s], src[s]) == (-1, -1), "a padding-only segment must have epoch/source -1"
            for p in range(s * seg_len, (s + 1) * seg_len):
                if cur is None:
                    assert (tok[p], lab[p], msk[p]) == (pad, pad, 0.0), f"lane {lane}: bad padding at {p}"
                    continue
                if expect_next is not None:
                    assert tok[p] == expect_next, f"lane {lane}: label is not the next token"
                cur["tokens"].append(tok[p])
                if msk[p] == 1.0:
                    expect_next = lab[p]
                else:
                    assert tok[p] == eos and lab[p] == pad, f"lane {lane}: a document must end with <eos>"
                    cur["tokens"].pop()
                    cur["tokens"] = tuple(cur["tokens"])
                    docs.append(cur)
                    cur, expect_next = None, None
    return docs


def epoch_documents(batches: Sequence[Dict], lanes: Sequence[int], epoch: int, source: int = 0,
                    eos=BYTES_EOS_ID, pad=BYTES_PAD_ID) -> Counter:
    """How often each document (as a token tuple) was read in `epoch` of `source`, over `lanes`."""
    out: Counter = Counter()
    for lane in lanes:
        for d in lane_documents(batches, lane, eos, pad):
            if d["epoch"] == epoch and d["source"] == source:
                out[d["tokens"]] += 1
    return out


def concat_ranks(per_rank: Sequence[Dict]) -> Dict:
    """One global batch from the ranks' batches (rank order is lane order)."""
    return {k: torch.cat([b[k] for b in per_rank]) for k in per_rank[0]}


def assert_batches_equal(a: Sequence[Dict], b: Sequence[Dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"batch {i}: {k} differs"
