"""Per-token loss weights: from weighted character spans in .jsonl to loss_mask, checked against
weights computed here from the spans alone; bad spans; unweighted sets unchanged; exact resume."""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from data_pipeline import BYTES_EOS_ID, BYTES_PAD_ID, DataConfig, DataError, SourceConfig, build_train_loader
from data_pipeline.make_shards import write_shards
from tests.data.helpers import (
    assert_batches_equal,
    char_weights,
    concat_ranks,
    lane_documents_with_weights,
    make_texts,
    random_spans,
    rewrite,
    run_until_epoch,
    train_bpe,
    weighted_corpus,
    write_docs,
)

SEG, NSEG = 64, 4


def byte_token_weights(doc):
    """One weight per UTF-8 byte: the weight of the character the byte belongs to."""
    return [w for ch, w in zip(doc["text"], char_weights(doc)) for _ in ch.encode("utf-8")]


def hf_token_weights(tok, doc):
    """Per token, the largest weight among the characters its offsets cover."""
    weights = char_weights(doc)
    return [
        max(weights[start : max(end, start + 1)])
        for start, end in tok.encode(doc["text"], add_special_tokens=False).offsets
    ]


def label_weights(token_weights):
    """Position i predicts token i+1; the last position predicts the appended <eos> (weight 1)."""
    return list(token_weights[1:]) + [1.0]


def assert_masks_match(batches, lanes, want, eos=BYTES_EOS_ID, pad=BYTES_PAD_ID):
    """Every document of `want` ({tokens: expected loss_mask}) read at least once, each read right."""
    seen = set()
    for lane in lanes:
        for doc in lane_documents_with_weights(batches, lane, eos, pad):
            assert doc["weights"] == pytest.approx(want[doc["tokens"]], abs=0), doc["tokens"][:20]
            seen.add(doc["tokens"])
    assert seen == set(want)


def make_cfg(path, **kw):
    base = dict(
        sources=[SourceConfig(path)],
        global_lanes=2,
        segment_length=SEG,
        n_segments=NSEG,
        seed=3,
        num_workers=0,
        shuffle_buffer=4,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def weighted_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("weighted")
    docs = weighted_corpus(40, seed=11)
    docs.append({"text": "naïve 漢字 🙂 end", "loss_weights": [[2, 3, 7.0], [6, 7, 0.0], [9, 10, 2.5]]})
    out = str(d / "shards")
    summary = write_shards([write_docs(d / "docs.jsonl", docs)], out, "bytes", shard_size="8KB", progress=False)
    return {"dir": out, "docs": docs, "summary": summary}


def test_bytes_loss_mask_holds_each_label_tokens_span_weight(weighted_set):
    docs = weighted_set["docs"]
    weighted = sum(any(w != 1.0 for w in char_weights(d)) for d in docs)
    assert weighted_set["summary"]["weighted_documents"] == weighted > 15
    index = json.load(open(os.path.join(weighted_set["dir"], "index.json")))
    assert index["weighted_documents"] == weighted and index["created_by"]["weights_field"] == "loss_weights"
    want = {tuple(d["text"].encode("utf-8")): label_weights(byte_token_weights(d)) for d in docs}
    # The non-ASCII document: ï (2 bytes) weighs 7 and is predicted from "a" and from its own first
    # byte; 漢 (3 bytes) weighs 0; 🙂 (4 bytes) 2.5.
    special = want[tuple(docs[-1]["text"].encode("utf-8"))]
    assert special[:4] == [1.0, 7.0, 7.0, 1.0]
    assert special[4:10] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0] and special[12:18] == [1.0] + [2.5] * 4 + [1.0]
    assert all(w == [1.0] * len(w) for d, w in zip(docs, want.values()) if "loss_weights" not in d)
    for workers in (0, 2):
        ld = build_train_loader(make_cfg(weighted_set["dir"], num_workers=workers), 0, 1)
        assert_masks_match(run_until_epoch([ld], 1), range(2), want)
        ld.close()


def test_hf_tokens_take_the_largest_weight_of_their_characters(tmp_path):
    texts = make_texts(30, seed=12)
    tok = train_bpe(tmp_path / "tok.json", texts)
    rng = np.random.default_rng(12)
    docs = [{"text": t, "loss_weights": random_spans(t, rng)} if i % 3 else {"text": t} for i, t in enumerate(texts)]
    out = str(tmp_path / "shards")
    write_shards([write_docs(tmp_path / "docs.jsonl", docs)], out, str(tmp_path / "tok.json"), progress=False)
    straddling = 0
    want = {}
    for doc in docs:
        enc = tok.encode(doc["text"], add_special_tokens=False)
        weights = char_weights(doc)
        straddling += sum(len(set(weights[a:b])) > 1 for a, b in enc.offsets)
        want[tuple(enc.ids)] = label_weights(hf_token_weights(tok, doc))
    assert straddling > 5, "the spans should cut through tokens"
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<pad>")
    ld = build_train_loader(make_cfg(out, global_lanes=4), 0, 1)
    assert_masks_match(run_until_epoch([ld], 1), range(4), want, eos=eos, pad=pad)


BAD_SPANS = [
    ({"loss_weights": [[0, 99, 2.0]]}, "not a non-empty range within the 9 characters"),
    ({"loss_weights": [[-1, 3, 2.0]]}, "not a non-empty range"),
    ({"loss_weights": [[4, 4, 2.0]]}, "not a non-empty range"),
    ({"loss_weights": [[0, 5, 2.0], [4, 8, 3.0]]}, "spans overlap: one ends at character 5, another starts at 4"),
    ({"loss_weights": [[0, 3, -1.0]]}, "finite number >= 0"),
    ({"loss_weights": [[0, 3, float("nan")]]}, "finite number >= 0"),
    ({"loss_weights": [[0, 3, True]]}, "finite number >= 0"),
    ({"loss_weights": [[0, 3, "2"]]}, "finite number >= 0"),
    ({"loss_weights": [[0.0, 3, 2.0]]}, "integer start and end"),
    ({"loss_weights": [[0, 3]]}, "not \\[start, end, weight\\]"),
    ({"loss_weights": {"0": 2.0}}, "must be a list of \\[start, end, weight\\], not dict"),
]


@pytest.mark.parametrize("field,message", BAD_SPANS)
def test_bad_spans_error_with_file_line_and_field_or_are_counted(tmp_path, field, message):
    src = write_docs(tmp_path / "x.jsonl", [{"text": "fine"}, {"text": "the text!", **field}, {"text": "also"}])
    with pytest.raises(DataError, match=rf"x\.jsonl:2: field 'loss_weights': .*{message}"):
        write_shards([src], str(tmp_path / "out"), progress=False)
    s = write_shards([src], str(tmp_path / "out2"), on_bad="skip", progress=False)
    assert s["documents"] == 2 and s["skipped"] == {"bad_weights": 1}


def test_a_damaged_weights_member_is_a_bad_sample(tmp_path):
    docs = [{"text": f"document {i}", "loss_weights": [[0, 3, 2.0]]} for i in range(4)]
    out = str(tmp_path / "shards")
    write_shards([write_docs(tmp_path / "x.jsonl", docs)], out, progress=False)
    shard = os.path.join(out, "shard-000000.tar")
    rewrite(shard, lambda items: [(n, b"[[0, 99, 2.0]]" if n == "000000002.weights.json" else d) for n, d in items])
    with pytest.raises(DataError, match=r"shard-000000\.tar document 000000002: has bad loss weights"):
        next(build_train_loader(make_cfg(out, global_lanes=1, n_segments=3), 0, 1))
    # Three segments take the three good documents of one read of the shard.
    ld = build_train_loader(make_cfg(out, global_lanes=1, n_segments=3, on_bad_sample="skip"), 0, 1)
    next(ld)
    assert ld.stats()["skipped"] == {"bad_weights": 1}


# The shards of make_texts(30, seed=9) from ./docs.jsonl at shard_size 8KB, written by the writer
# before loss weights existed.
UNWEIGHTED_SHARDS_SHA256 = "1ba096c78496d8fd58ad7a3e0cc650a26e39e238342f2229bdae08a1b7b519f6"


def shard_bytes(out):
    return [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "shard-*.tar")))]


def test_unweighted_documents_are_stored_and_read_as_before(tmp_path, monkeypatch):
    texts = make_texts(30, seed=9)
    # A document's metadata names its input file: both sets are written from ./docs.jsonl.
    fields = [None, [], [[0, 2, 1.0]], [[0, 1, 1.0], [1, 2, 1]]]  # null, empty, or weight 1 throughout
    variants = {
        "plain": [{"text": t} for t in texts],
        "trivial": [{"text": t, "loss_weights": fields[i % 4]} for i, t in enumerate(texts)],
    }
    for name, docs in variants.items():
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        write_shards([write_docs("docs.jsonl", docs)], "out", "bytes", shard_size="8KB", progress=False)
    plain, trivial = str(tmp_path / "plain" / "out"), str(tmp_path / "trivial" / "out")
    assert hashlib.sha256(b"".join(shard_bytes(plain))).hexdigest() == UNWEIGHTED_SHARDS_SHA256
    assert shard_bytes(trivial) == shard_bytes(plain)
    for name in ("doc_tokens.npy", "doc_offsets.npy", "index.json"):
        assert open(os.path.join(trivial, name), "rb").read() == open(os.path.join(plain, name), "rb").read()
    with tarfile.open(os.path.join(plain, "shard-000000.tar")) as t:
        assert all(not m.name.endswith("weights.json") for m in t.getmembers())
    loaders = [build_train_loader(make_cfg(d, num_workers=1), 0, 1) for d in (plain, trivial)]
    a, b = ([next(ld) for _ in range(40)] for ld in loaders)
    for ld in loaders:
        ld.close()
    assert_batches_equal(a, b)
    assert all(set(x["loss_mask"].unique().tolist()) <= {0.0, 1.0} for x in a)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_mid_document_with_weights_is_exact_and_elastic(weighted_set):
    cfg = make_cfg(weighted_set["dir"], global_lanes=4, num_workers=2)
    ld = build_train_loader(cfg, 0, 1)
    ref, states = [], [copy.deepcopy(ld.state_dict())]
    for _ in range(24):
        ref.append(next(ld))
        states.append(copy.deepcopy(ld.state_dict()))
    ld.close()

    def resumes_a_weighted_document(batch):
        """A lane whose first segment goes on with a document and has a weight other than 0 and 1."""
        first = batch["loss_mask"][~batch["reset"][:, 0], :SEG]
        return bool(((first != 0) & (first != 1)).any())

    mid = [k for k in range(1, 18) if resumes_a_weighted_document(ref[k])][:2]
    assert mid, "no resume point inside a weighted document"
    for i, k in enumerate(mid):
        resumed = build_train_loader(make_cfg(weighted_set["dir"], global_lanes=4, num_workers=[0, 3][i % 2]), 0, 1)
        resumed.load_state_dict(json.loads(json.dumps(states[k])))
        assert_batches_equal([next(resumed) for _ in range(6)], ref[k : k + 6])
        resumed.close()
    two = [build_train_loader(make_cfg(weighted_set["dir"], global_lanes=4), r, 2) for r in range(2)]
    for loader in two:
        loader.load_state_dict(states[mid[0]])
    assert_batches_equal([concat_ranks([next(loader) for loader in two]) for _ in range(6)], ref[mid[0] : mid[0] + 6])
