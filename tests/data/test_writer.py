"""Shard writer: round trips (read back with tarfile, not with our reader), formats, tokenizers,
parallelism, the stdlib source, the CLI and bad input."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline import DataConfig, DataError, SourceConfig, build_train_loader
from data_pipeline.make_shards import build_stdlib_shards, tar_member, write_shards
from tests.data.helpers import epoch_documents, make_texts, train_bpe, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_back(out_dir):
    """Every document as (token ids, metadata), in shard and tar order, straight from the tars."""
    index = json.load(open(os.path.join(out_dir, "index.json")))
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    docs = []
    for shard in index["shards"]:
        samples = {}
        with tarfile.open(os.path.join(out_dir, shard["name"])) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        assert len(samples) == shard["n_documents"]
        assert list(samples) == sorted(samples)
        for files in samples.values():
            ids = np.frombuffer(files[f"tokens.{'u16' if dtype.itemsize == 2 else 'u32'}"], dtype=dtype)
            meta = json.loads(files["json"])
            assert meta["n_tokens"] == len(ids)
            docs.append((ids, meta))
        assert sum(len(d[0]) for d in docs[-shard["n_documents"] :]) == shard["n_tokens"]
    assert len(docs) == index["n_documents"]
    assert np.array_equal(np.load(os.path.join(out_dir, "doc_tokens.npy")), [len(d[0]) for d in docs])
    return index, docs


def test_bytes_round_trip_over_every_input_kind(tmp_path):
    texts = make_texts(40, seed=3)
    txt_dir = tmp_path / "txt"
    (txt_dir / "sub").mkdir(parents=True)
    for i, t in enumerate(texts[:6]):
        (txt_dir / ("sub" if i % 2 else ".") / f"d{i}.txt").write_text(t, encoding="utf-8")
    (txt_dir / "notes.md").write_text("not an input")
    write_jsonl(str(tmp_path / "a.jsonl"), texts[6:12])
    write_jsonl(str(tmp_path / "b.jsonl"), texts[12:18])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in texts[18:26]:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": texts[26:40]}), tmp_path / "d.parquet")
    out = str(tmp_path / "out")
    # The text field name applies to every input; so write the jsonl/txt part and the rest apart.
    s1 = write_shards([str(txt_dir), str(tmp_path / "*.jsonl")], out, "bytes", shard_size="4KB", progress=False)
    index, docs = read_back(out)
    walk_order = [0, 2, 4, 1, 3, 5]  # d0 d2 d4 at the top, then sub/d1 d3 d5
    want = [texts[i] for i in walk_order] + texts[6:18]
    assert [bytes(d[0].astype(np.uint8)).decode() for d in docs] == want
    assert index["dtype"] == "uint16" and index["tokenizer"]["vocab_size"] == 258
    assert s1["documents"] == 18 and s1["shards"] == len(index["shards"]) > 3
    first = [s["first_document"] for s in index["shards"]] + [len(docs)]
    token_bytes = [sum(2 * len(d[0]) for d in docs[a:b]) for a, b in zip(first, first[1:])]
    assert all(n <= 4000 or s["n_documents"] == 1 for n, s in zip(token_bytes, index["shards"]))
    assert docs[0][1]["source"].endswith("d0.txt") and docs[6][1]["source"].endswith("a.jsonl:1")

    out2 = str(tmp_path / "out2")
    write_shards(
        [str(tmp_path / "c.jsonl.gz"), str(tmp_path / "d.parquet")], out2, "bytes", text_field="body", progress=False
    )
    _, docs2 = read_back(out2)
    assert [bytes(d[0].astype(np.uint8)).decode() for d in docs2] == texts[18:40]
    assert docs2[8][1]["source"].endswith("d.parquet:row0")


def test_workers_change_nothing_but_speed(tmp_path):
    src = write_jsonl(str(tmp_path / "x.jsonl"), make_texts(300, seed=4))
    one = write_shards([src], str(tmp_path / "w1"), "bytes", shard_size="32KB", workers=1, progress=False)
    two = write_shards([src], str(tmp_path / "w2"), "bytes", shard_size="32KB", workers=2, progress=False)
    i1, d1 = read_back(str(tmp_path / "w1"))
    i2, d2 = read_back(str(tmp_path / "w2"))
    assert i1["dataset_id"] == i2["dataset_id"] and one["shards"] == two["shards"]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(d1, d2))


def test_hf_tokenizer_round_trip_and_reader(tmp_path):
    texts = make_texts(60, seed=5)
    tok = train_bpe(tmp_path / "tok.json", texts)
    src = write_jsonl(str(tmp_path / "x.jsonl"), texts)
    out = str(tmp_path / "out")
    write_shards([src], out, str(tmp_path / "tok.json"), shard_size="8KB", workers=2, progress=False)
    index, docs = read_back(out)
    spec = index["tokenizer"]
    assert spec["kind"] == "hf" and spec["vocab_size"] == tok.get_vocab_size() > 258
    assert (spec["eos_id"], spec["pad_id"]) == (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<pad>"))
    assert [tok.decode(d[0].tolist()) for d in docs] == texts
    ref = [tuple(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    cfg = DataConfig(sources=[SourceConfig(out)], global_lanes=4, segment_length=32, n_segments=4, num_workers=0)
    ld = build_train_loader(cfg, 0, 1)
    assert ld.vocab_size == spec["vocab_size"] and ld.eos_id == spec["eos_id"]
    batches = [next(ld) for _ in range(200)]
    assert epoch_documents(batches, range(4), 0, eos=spec["eos_id"], pad=spec["pad_id"]) == Counter(ref)


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70000)}
    vocab["</s>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 70000, int(rng.integers(5, 80))).tolist() for _ in range(12)]
    src = write_jsonl(str(tmp_path / "x.jsonl"), [" ".join(f"w{i}" for i in d) for d in ids])
    out = str(tmp_path / "out")
    write_shards([src], out, str(tmp_path / "big.json"), progress=False)
    index, docs = read_back(out)
    assert index["dtype"] == "uint32" and index["tokenizer"]["vocab_size"] == 70001
    assert [d[0].tolist() for d in docs] == ids
    cfg = DataConfig(sources=[SourceConfig(out)], global_lanes=2, segment_length=16, n_segments=2, num_workers=0)
    ld = build_train_loader(cfg, 0, 1)
    batches = [next(ld) for _ in range(60)]
    assert epoch_documents(batches, range(2), 0, eos=70000, pad=70000) == Counter(tuple(d) for d in ids)


def test_stdlib_source_builds_in_seconds(tmp_path):
    index_path = build_stdlib_shards(str(tmp_path / "std"), max_files=80)
    index, docs = read_back(str(tmp_path / "std"))
    skipped = index["created_by"]["skipped"]
    assert index_path.endswith("index.json")
    assert len(docs) + sum(skipped.values()) == 80
    first = docs[0][1]["source"]
    assert bytes(docs[0][0].astype(np.uint8)) == open(first, "rb").read()


def test_existing_output_is_not_overwritten_by_accident(tmp_path):
    src = write_jsonl(str(tmp_path / "x.jsonl"), ["one", "two"])
    out = str(tmp_path / "out")
    write_shards([src], out, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        write_shards([src], out, progress=False)
    write_shards([write_jsonl(str(tmp_path / "y.jsonl"), ["three"])], out, overwrite=True, progress=False)
    assert [bytes(d[0].astype(np.uint8)) for d in read_back(out)[1]] == [b"three"]


BAD_LINES = [
    (b'{"text": "caf\xe9"}\n', "not_utf8", "UTF-8"),
    (b'{"text": "unterminated}\n', "bad_json", "JSON"),
    (b'{"body": "wrong field"}\n', "no_text", "'text'"),
    (b'{"text": ""}\n', "empty", "empty document"),
    (b'{"text": 3}\n', "no_text", "not a string"),
]


@pytest.mark.parametrize("line,category,message", BAD_LINES)
def test_bad_jsonl_lines_error_with_file_and_line_or_are_counted(tmp_path, line, category, message):
    src = tmp_path / "x.jsonl"
    src.write_bytes(b'{"text": "fine"}\n\n' + line + b'{"text": "also fine"}\n')
    with pytest.raises(DataError, match=rf"x\.jsonl:3: .*{message}"):
        write_shards([str(src)], str(tmp_path / "out"), progress=False)
    s = write_shards([str(src)], str(tmp_path / "out2"), on_bad="skip", progress=False)
    assert s["documents"] == 2 and s["skipped"] == {category: 1}
    assert json.load(open(tmp_path / "out2" / "index.json"))["created_by"]["skipped"] == {category: 1}


def test_bad_txt_and_parquet_documents(tmp_path):
    (tmp_path / "ok.txt").write_text("hello")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt: empty document"):
        write_shards([str(tmp_path / "empty.txt")], str(tmp_path / "o1"), progress=False)
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8"):
        write_shards([str(tmp_path / "latin1.txt")], str(tmp_path / "o2"), progress=False)
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet:row1: 'text' is null"):
        write_shards([str(tmp_path / "n.parquet")], str(tmp_path / "o3"), progress=False)
    s = write_shards([str(tmp_path)], str(tmp_path / "o4"), on_bad="skip", progress=False)
    assert s["documents"] == 3 and s["skipped"] == {"not_utf8": 1, "empty": 1, "no_text": 1}
    with pytest.raises(DataError, match="no column 'body'"):
        write_shards([str(tmp_path / "n.parquet")], str(tmp_path / "o5"), text_field="body", progress=False)
    with pytest.raises(DataError, match="no such file"):
        write_shards([str(tmp_path / "nope.jsonl")], str(tmp_path / "o6"), progress=False)


def test_cli(tmp_path):
    src = write_jsonl(str(tmp_path / "x.jsonl"), make_texts(20, seed=6))
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "data_pipeline.make_shards",
        src,
        "--output",
        str(tmp_path / "out"),
        "--tokenizer",
        "bytes",
        "--shard-size",
        "8KB",
        "--workers",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 20 documents" in r.stderr and "MB/s" in r.stderr
    assert len(read_back(str(tmp_path / "out"))[1]) == 20
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    r = subprocess.run(
        cmd[:3] + [str(bad)] + cmd[4:] + ["--overwrite"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 1 and "bad.jsonl:1: not valid UTF-8" in r.stderr


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 5000])
def test_tar_members_are_what_tarfile_reads(size):
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    blob = tar_member("000000007.tokens.u16", data) + tar_member("000000007.json", b"{}") + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        members = t.getmembers()
        assert [(m.name, m.size, m.isreg()) for m in members] == [
            ("000000007.tokens.u16", size, True),
            ("000000007.json", 2, True),
        ]
        assert t.extractfile(members[0]).read() == data
