"""Test helpers: a synthetic corpus whose raw token lists are the reference, an independent checker of
the batch layout (it reconstructs documents from batches by itself), weighted corpora, a small BPE
tokenizer, and surgery on written shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from typing import Dict, List, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def epoch_documents(
    batches: Sequence[Dict], lanes: Sequence[int], epoch: int, source: int = 0, eos=BYTES_EOS_ID, pad=BYTES_PAD_ID
) -> Counter:
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


def rewrite(path, fn):
    """Rewrite a shard's members through fn, keeping the index's document offsets true (so the
    damage is in the content, not in a shard/index mismatch)."""
    with tarfile.open(path) as t:
        items = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:
        for name, data in fn(items):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    d = os.path.dirname(path)
    index = json.load(open(os.path.join(d, "index.json")))
    shard = next(s for s in index["shards"] if s["name"] == os.path.basename(path))
    offsets = np.load(os.path.join(d, "doc_offsets.npy"))
    for k in range(shard["n_documents"]):
        offsets[shard["first_document"] + k] = sample_offset(path, k)
    np.save(os.path.join(d, "doc_offsets.npy"), offsets)


def run_until_epoch(loaders, epoch: int, source: int = 0, max_steps: int = 3000):
    """Global batches until every lane has begun `epoch` of `source` (earlier epochs are then complete)."""
    batches, seen = [], None
    for _ in range(max_steps):
        batches.append(concat_ranks([next(ld) for ld in loaders]))
        b = batches[-1]
        reached = ((b["epoch"] >= epoch) & (b["source"] == source)).any(dim=1)
        seen = reached if seen is None else seen | reached
        if seen.all():
            return batches
    raise AssertionError(f"not every lane reached epoch {epoch} in {max_steps} steps")


def train_bpe(path, texts, vocab_size=400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


def write_docs(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    return str(path)


def random_spans(text, rng):
    """1-3 non-overlapping character spans of text with weights among 0, 0.5, 3 and 10."""
    cuts = sorted(rng.choice(np.arange(len(text) + 1), size=min(6, len(text) + 1), replace=False).tolist())
    pairs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
    return [[a, b, float(rng.choice([0.0, 0.5, 3.0, 10.0]))] for a, b in pairs[: int(rng.integers(1, 4))]]


def weighted_corpus(n, seed):
    """Every other document of make_texts with random weighted spans (ASCII and multi-byte text)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i, text in enumerate(make_texts(n, seed=seed)):
        docs.append({"text": text, "loss_weights": random_spans(text, rng)} if i % 2 == 0 else {"text": text})
    return docs


def char_weights(doc):
    weights = [1.0] * len(doc["text"])
    for start, end, weight in doc.get("loss_weights") or []:
        for c in range(start, end):
            weights[c] = weight
    return weights


def lane_documents_with_weights(batches, lane, eos=BYTES_EOS_ID, pad=BYTES_PAD_ID):
    """One lane's completed documents as {tokens, weights: loss_mask at each token's position},
    asserting the layout: labels are the next token (whatever the weight), <eos> ends a document
    with mask 0 and label pad, padding has mask 0."""
    docs, cur = [], None
    for b in batches:
        row = b["lane_ids"].tolist().index(lane)
        tok, lab, msk, rst = (b[k][row].tolist() for k in ("tokens", "labels", "loss_mask", "reset"))
        seg_len = len(tok) // len(rst)
        for p in range(len(tok)):
            if p % seg_len == 0 and rst[p // seg_len]:
                assert cur is None, "reset while a document is still running"
                cur = {"tokens": [], "weights": [], "labels": []}
            if cur is None:
                assert (tok[p], lab[p], msk[p]) == (pad, pad, 0.0), f"bad padding at {p}"
            elif tok[p] == eos:
                assert (msk[p], lab[p]) == (0.0, pad), "a document's last token has no label"
                assert cur["labels"] == cur["tokens"][1:] + [eos], "labels must be the next tokens"
                docs.append({"tokens": tuple(cur["tokens"]), "weights": cur["weights"]})
                cur = None
            else:
                cur["tokens"].append(tok[p])
                cur["weights"].append(msk[p])
                cur["labels"].append(lab[p])
    return docs


def sample_key(k):
    """The tar member name stem of a shard's sample k."""
    return f"{k:09d}"


def sample_offset(path, k):
    """Where sample k's first tar member (header included) begins."""
    with tarfile.open(path) as t:
        return min(m.offset for m in t.getmembers() if m.name.startswith(f"{sample_key(k)}."))
