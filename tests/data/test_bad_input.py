"""Bad shards: every case is a clear error naming the shard (and document), or, with
on_bad_sample='skip', skipped and counted exactly - the rest of the data still read once."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest

from data_pipeline import DataConfig, DataError, SourceConfig, build_train_loader, build_valid_loader
from tests.data.helpers import epoch_documents, rewrite, sample_key, sample_offset

SHARD = 3  # the shard that gets damaged
K = 2  # the document within it


def replace_tokens(data_fn):
    def fn(items):
        return [(n, data_fn(d) if n == f"{sample_key(K)}.tokens.u16" else d) for n, d in items]

    return fn


def drop_tokens(items):
    return [(n, d) for n, d in items if n != f"{sample_key(K)}.tokens.u16"]


def corrupt_header(path):
    with open(path, "r+b") as f:
        f.seek(sample_offset(path, K))
        f.write(b"\xff" * 512)


def truncate_at(member, delta):
    """Cut the shard `delta` bytes into sample K's first member, or into its token ids' data."""

    def fn(path):
        if member == "first":
            off = sample_offset(path, K)
        else:
            with tarfile.open(path) as t:
                off = t.getmember(f"{sample_key(K)}.tokens.u16").offset_data
        with open(path, "r+b") as f:
            f.truncate(off + delta)

    return fn


def bad_id(data):
    ids = np.frombuffer(data, dtype="<u2").copy()
    ids[len(ids) // 2] = 300
    return ids.tobytes()


# name: (damage a shard file, the reason category, documents at risk: "from K" on (a lane that starts
# reading past the damage seeks over it), "K" alone or "all" of the shard, error text)
CASES = {
    "corrupt header": (corrupt_header, "unreadable", "from K", "missing from the shard"),
    "truncated at a member boundary": (truncate_at("first", 0), "unreadable", "from K", "missing from the shard"),
    "truncated inside a member": (truncate_at("tokens", 64), "unreadable", "from K", "cannot read .*ReadError"),
    "sample without tokens": (lambda p: rewrite(p, drop_tokens), "no_tokens", "K", "has no token ids"),
    "empty document": (lambda p: rewrite(p, replace_tokens(lambda d: b"")), "empty", "K", "is an empty document"),
    "token id >= vocab": (
        lambda p: rewrite(p, replace_tokens(bad_id)),
        "bad_token_id",
        "K",
        "token id 300 >= vocab size 258",
    ),
    "length differs from index": (
        lambda p: rewrite(p, replace_tokens(lambda d: d[:-2])),
        "length_mismatch",
        "K",
        "tokens, the index says",
    ),
    "missing shard": (os.remove, "unreadable", "all", "missing shard"),
}


@pytest.fixture
def damaged(corpus, tmp_path, request):
    d = str(tmp_path / "set")
    shutil.copytree(corpus["dir"], d)
    index = json.load(open(os.path.join(d, "index.json")))
    shard = index["shards"][SHARD]
    assert shard["n_documents"] > K + 1
    damage, category, at_risk, text = CASES[request.param]
    damage(os.path.join(d, shard["name"]))
    first, n = shard["first_document"], shard["n_documents"]
    region = {"all": range(first, first + n), "from K": range(first + K, first + n), "K": [first + K]}[at_risk]
    return {
        "dir": d,
        "name": shard["name"],
        "category": category,
        "region": list(region),
        "text": text,
        "exact": at_risk != "from K",
    }


def check_losses(delivered: Counter, ref, damaged) -> int:
    """Every document read at most once; the lost ones are damaged ones (document K always).
    Returns how many were lost."""
    assert max(delivered.values()) == 1
    missing = Counter(ref) - delivered
    region = {ref[i] for i in damaged["region"]}
    assert set(missing) <= region and ref[damaged["region"][0]] in missing
    if damaged["exact"]:
        assert set(missing) == region
    return sum(missing.values())


def cfg_for(d, on_bad, workers=0, **kw):
    kw.setdefault("global_lanes", 4)
    return DataConfig(
        sources=[SourceConfig(d)], segment_length=64, n_segments=4, num_workers=workers, on_bad_sample=on_bad, **kw
    )


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_error_names_shard_and_document(damaged):
    with pytest.raises(DataError, match=damaged["text"]) as e:
        ld = build_train_loader(cfg_for(damaged["dir"], "error"), 0, 1)
        for _ in range(400):
            next(ld)
    assert damaged["name"] in str(e.value)
    if damaged["category"] != "unreadable":
        assert f"document {sample_key(K)}" in str(e.value)


@pytest.mark.parametrize("lanes", [4, 48])
@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_skip_counts_exactly_and_reads_everything_else_once(damaged, corpus, lanes):
    cfg = cfg_for(damaged["dir"], "skip", valid_sources=[SourceConfig(damaged["dir"])], global_lanes=lanes)
    valid = build_valid_loader(cfg, 0, 1)
    lost = check_losses(epoch_documents(list(valid), range(lanes), 0), corpus["ref"], damaged)
    assert valid.stats()["skipped"] == {damaged["category"]: lost}


@pytest.mark.parametrize("damaged", ["corrupt header"], indirect=True)
def test_errors_cross_dataloader_workers_without_hanging(damaged):
    ld = build_train_loader(cfg_for(damaged["dir"], "error", workers=2, worker_timeout_s=60), 0, 1)
    with pytest.raises(DataError, match=damaged["name"]):
        for _ in range(400):
            next(ld)
    with pytest.raises(DataError, match=damaged["name"]):  # a retry restarts and meets the same damage
        for _ in range(400):
            next(ld)


@pytest.mark.parametrize("damaged", ["corrupt header"], indirect=True)
def test_skip_in_training_keeps_going_across_epochs(damaged, corpus):
    ld = build_train_loader(cfg_for(damaged["dir"], "skip", workers=2), 0, 1)
    batches = [next(ld) for _ in range(250)]
    assert int(max(b["epoch"].max() for b in batches)) >= 1
    lost = check_losses(epoch_documents(batches, range(4), 0), corpus["ref"], damaged)
    assert ld.stats()["skipped"]["unreadable"] >= lost


def test_index_declaring_an_empty_document(corpus, tmp_path):
    d = str(tmp_path / "set")
    shutil.copytree(corpus["dir"], d)
    index = json.load(open(os.path.join(d, "index.json")))
    lengths = np.load(os.path.join(d, "doc_tokens.npy"))
    shard = index["shards"][SHARD]
    g = shard["first_document"] + K
    shard["n_tokens"] -= int(lengths[g])
    lengths[g] = 0
    np.save(os.path.join(d, "doc_tokens.npy"), lengths)
    json.dump(index, open(os.path.join(d, "index.json"), "w"))
    with pytest.raises(DataError, match=rf"empty document.*{shard['name']} document {sample_key(K)}"):
        build_train_loader(cfg_for(d, "error"), 0, 1)
    valid = build_valid_loader(cfg_for(d, "skip", valid_sources=[SourceConfig(d)]), 0, 1)
    batches = list(valid)
    assert epoch_documents(batches, range(4), 0) == Counter(corpus["ref"]) - Counter([corpus["ref"][g]])
    assert valid.stats()["filtered"][0]["empty"] == 1


def test_index_that_does_not_match_its_shard(corpus, tmp_path):
    d = str(tmp_path / "set")
    shutil.copytree(corpus["dir"], d)
    offsets = np.load(os.path.join(d, "doc_offsets.npy"))
    offsets[1:] += 100
    np.save(os.path.join(d, "doc_offsets.npy"), offsets)
    ld = build_train_loader(cfg_for(d, "error", global_lanes=48), 0, 1)
    with pytest.raises(DataError, match="does the index belong to this shard"):
        for _ in range(100):
            next(ld)


def test_missing_or_foreign_index(tmp_path, corpus):
    with pytest.raises(DataError, match="no shard index"):
        build_train_loader(cfg_for(str(tmp_path), "error"), 0, 1)
    (tmp_path / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a infinitron-shards"):
        build_train_loader(cfg_for(str(tmp_path), "error"), 0, 1)
