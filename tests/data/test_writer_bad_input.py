"""Shard writer on bad input: a failed run leaves its output as it was, scraped text with lone
surrogates or spelled-out special tokens, unreadable parquet, and files a folder scan leaves out.
Each case runs the real writer (the CLI where the user-facing text matters) on files in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from data_pipeline import DataError
from data_pipeline.make_shards import write_shards
from tests.data.helpers import make_texts, write_jsonl
from tests.data.test_writer import ROOT, read_back, train_bpe


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.make_shards", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def texts_of(out_dir):
    return [bytes(ids.astype(np.uint8)).decode("utf-8") for ids, _ in read_back(out_dir)[1]]


def file_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)}


def test_failed_run_leaves_no_output_and_the_same_command_then_succeeds(tmp_path):
    texts = make_texts(300, seed=7)
    src = tmp_path / "x.jsonl"
    write_jsonl(str(src), texts)
    with open(src, "ab") as f:  # after 300 good documents, tens of 8 KB shards in
        f.write(b'{"text": "caf\xe9"}\n')
    out = tmp_path / "out"
    args = [str(src), "--output", str(out), "--tokenizer", "bytes", "--shard-size", "8KB"]
    failed = run_cli(*args)
    assert failed.returncode == 1 and "x.jsonl:301: not valid UTF-8" in failed.stderr
    assert not out.exists()
    write_jsonl(str(src), texts)
    fixed = run_cli(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert texts_of(str(out)) == texts


def test_failure_keeps_an_existing_directory_and_an_old_set_even_with_overwrite(tmp_path):
    old_texts = make_texts(200, seed=8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES").write_text("the user's own file")
    write_shards([write_jsonl(str(tmp_path / "old.jsonl"), old_texts)], str(out), shard_size="8KB", progress=False)
    before = file_bytes(str(out))
    assert len([n for n in before if n.startswith("shard-")]) > 3
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        write_shards([str(bad)], str(out), overwrite=True, progress=False)
    assert file_bytes(str(out)) == before
    # A successful overwrite with fewer shards leaves none of the old ones behind.
    write_shards([write_jsonl(str(tmp_path / "new.jsonl"), ["new"])], str(out), overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["NOTES", "doc_offsets.npy", "doc_tokens.npy", "index.json", "shard-000000.tar"]
    assert texts_of(str(out)) == ["new"]


def test_the_leftover_of_a_killed_run_needs_no_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / ".partial").mkdir(parents=True)
    (out / ".partial" / "shard-000000.tar").write_bytes(b"half a shard")
    write_shards([write_jsonl(str(tmp_path / "x.jsonl"), ["a", "b"])], str(out), progress=False)
    assert sorted(os.listdir(out)) == ["doc_offsets.npy", "doc_tokens.npy", "index.json", "shard-000000.tar"]
    assert texts_of(str(out)) == ["a", "b"]


# JSON text of three documents; the second escapes a lone high surrogate, as scraped pages do. The
# third holds a proper surrogate pair, which JSON decodes to one character and which is fine.
SURROGATE_LINES = b'{"text": "first"}\n{"text": "cut \\ud83d here"}\n{"text": "pair \\ud83d\\ude42"}\n'


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_lone_surrogate_is_a_bad_document(tmp_path, tokenizer):
    src = tmp_path / "s.jsonl"
    src.write_bytes(SURROGATE_LINES)
    tok = "bytes" if tokenizer == "bytes" else str(tmp_path / "tok.json")
    if tokenizer == "bpe":
        train_bpe(tok, make_texts(30, seed=9))
    failed = run_cli(str(src), "--output", str(tmp_path / "o1"), "--tokenizer", tok)
    assert failed.returncode == 1
    assert "s.jsonl:2: field 'text' holds a lone surrogate U+D83D at character 4" in failed.stderr
    assert not (tmp_path / "o1").exists()
    skipped = run_cli(str(src), "--output", str(tmp_path / "o2"), "--tokenizer", tok, "--on-bad", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "wrote 2 documents" in skipped.stderr and "skipped: lone_surrogate 1" in skipped.stderr
    index, docs = read_back(str(tmp_path / "o2"))
    assert index["created_by"]["skipped"] == {"lone_surrogate": 1}
    assert [d[1]["source"].rsplit(":", 1)[1] for d in docs] == ["1", "3"]
    if tokenizer == "bytes":
        assert texts_of(str(tmp_path / "o2")) == ["first", "pair \N{SLIGHTLY SMILING FACE}"]


def test_parquet_text_column_that_is_not_text(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: column 'text' holds int64, not text"):
        write_shards([str(tmp_path / "ints.parquet")], str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    # Dictionary-encoded (pandas categorical) and large strings are text.
    pq.write_table(pa.table({"text": pa.array(["b", "a", "b"]).dictionary_encode()}), tmp_path / "dict.parquet")
    pq.write_table(pa.table({"text": pa.array(["c"], pa.large_string())}), tmp_path / "large.parquet")
    write_shards(
        [str(tmp_path / "dict.parquet"), str(tmp_path / "large.parquet")], str(tmp_path / "ok"), progress=False
    )
    assert texts_of(str(tmp_path / "ok")) == ["b", "a", "b", "c"]


def test_corrupt_parquet_files_name_file_and_column(tmp_path):
    texts = [f"row {i} " * 40 for i in range(3000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "good.parquet", compression="snappy")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    garbled = bytearray(data)
    garbled[100:3000] = b"\xab" * 2900  # the first data page; the footer stays intact
    (tmp_path / "garbled.parquet").write_bytes(bytes(garbled))
    r = run_cli(str(tmp_path / "truncated.parquet"), "--output", str(tmp_path / "o1"), "--tokenizer", "bytes")
    assert r.returncode == 1 and "truncated.parquet: not a readable parquet file" in r.stderr
    r = run_cli(str(tmp_path / "garbled.parquet"), "--output", str(tmp_path / "o2"), "--tokenizer", "bytes")
    assert r.returncode == 1 and "garbled.parquet: cannot read column 'text' from row 0" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_files_a_folder_scan_leaves_out_are_counted(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("lower")
    (d / "B.TXT").write_text("upper")
    write_jsonl(str(d / "sub" / "C.JSONL"), ["upper jsonl"])
    (d / "notes.md").write_text("#")
    (d / "sub" / "README.md").write_text("#")
    (d / "sub" / "data.json").write_text('{"text": "a json file"}')
    (d / "sub" / "dump.json.gz").write_bytes(b"")
    (d / "LICENSE").write_text("no extension")
    out = tmp_path / "out"
    r = run_cli(str(d), "--output", str(out), "--tokenizer", "bytes")
    assert r.returncode == 0, r.stderr
    assert "wrote 3 documents" in r.stderr
    assert "ignored 5 files of other types ((none) 1, .json 1, .json.gz 1, .md 2)" in r.stderr
    assert sorted(texts_of(str(out))) == ["lower", "upper", "upper jsonl"]
    index = json.load(open(out / "index.json"))
    assert index["created_by"]["ignored"] == {"(none)": 1, ".json": 1, ".json.gz": 1, ".md": 2}
    # A glob counts what it leaves out too; a file named outright must be an input.
    s = write_shards([str(d / "*")], str(tmp_path / "glob"), progress=False)
    assert s["documents"] == 3 and s["ignored"] == {"(none)": 1, ".json": 1, ".json.gz": 1, ".md": 2}
    with pytest.raises(DataError, match=r"notes\.md: unsupported input"):
        write_shards([str(d / "notes.md")], str(tmp_path / "named"), progress=False)
    with pytest.raises(DataError, match=r"no input files \(ignored 1 files of other types \(\.json 1\)\)"):
        write_shards([str(d / "sub" / "*.json")], str(tmp_path / "none"), progress=False)


def test_text_spelling_a_special_token_stays_text(tmp_path):
    texts = make_texts(40, seed=10)
    tok = train_bpe(tmp_path / "tok.json", texts)
    eos = tok.token_to_id("<|endoftext|>")
    # The same model with no added tokens: an independent reference for encoding the text as text.
    spec = json.load(open(tmp_path / "tok.json"))
    spec["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(spec))
    docs = ["a page that quotes <|endoftext|> mid-text", "<|endoftext|>", "ends with<|endoftext|>"]
    out = tmp_path / "out"
    r = run_cli(
        write_jsonl(str(tmp_path / "x.jsonl"), docs), "--output", str(out), "--tokenizer", str(tmp_path / "tok.json")
    )
    assert r.returncode == 0, r.stderr
    ids = [d[0].tolist() for d in read_back(str(out))[1]]
    assert all(eos not in i for i in ids)
    assert ids == [plain.encode(t, add_special_tokens=False).ids for t in docs]
    assert [tok.decode(i) for i in ids] == docs
