"""Reader: coverage per epoch over ranks and workers, exact resume, elasticity, mixing, splits."""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import weakref
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data_pipeline import (
    DataConfig,
    DataError,
    SourceConfig,
    build_train_loader,
    build_valid_loader,
    gather_state_dict,
    merge_state_dicts,
)
from tests.data.helpers import assert_batches_equal, concat_ranks, epoch_documents, lane_documents, run_until_epoch
from tests.distributed import run_distributed

SEG, NSEG = 64, 4


def make_cfg(corpus, **kw) -> DataConfig:
    base = dict(
        sources=[SourceConfig(path=corpus["dir"])],
        global_lanes=4,
        segment_length=SEG,
        n_segments=NSEG,
        seed=7,
        num_workers=2,
        shuffle_buffer=4,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("lanes", [4, 48])
def test_two_ranks_two_workers_read_every_token_once_per_epoch(corpus, lanes):
    cfg = make_cfg(corpus, global_lanes=lanes)
    n_shards = len(json.load(open(f"{corpus['dir']}/index.json"))["shards"])
    assert lanes < n_shards or lanes > 2 * n_shards, "cover both: lanes read several shards / share shards"
    loaders = [build_train_loader(cfg, r, 2) for r in range(2)]
    batches = run_until_epoch(loaders, 2)
    half = lanes // 2
    for b in batches[:3]:
        assert b["lane_ids"].tolist() == list(range(lanes))
        assert b["tokens"].dtype == torch.int64 and b["labels"].dtype == torch.int64
        assert b["loss_mask"].dtype == torch.float32 and b["reset"].dtype == torch.bool
        assert b["tokens"].shape == (lanes, SEG * NSEG) and b["reset"].shape == (lanes, NSEG)
    assert batches[0]["reset"][:, 0].all(), "every lane starts with a document"
    want = Counter(corpus["ref"])
    for epoch in (0, 1):
        assert epoch_documents(batches, range(lanes), epoch) == want
    orders = [[d["tokens"] for d in lane_documents(batches, 0) if d["epoch"] == e] for e in (0, 1)]
    assert orders[0] != orders[1], "epochs should differ in order"
    for r, ld in enumerate(loaders):
        assert ld.lane_ids == list(range(r * half, (r + 1) * half))
        ld.close()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_is_exact_mid_document_mid_shard_and_at_epoch_boundary(corpus, corpus_b):
    cfg = make_cfg(corpus, sources=[SourceConfig(corpus["dir"], 3.0), SourceConfig(corpus_b["dir"], 1.0)])
    ld = build_train_loader(cfg, 0, 1)
    ref, states = [], [copy.deepcopy(ld.state_dict())]
    seen = torch.zeros(4, dtype=torch.bool)
    while not seen.all() or len(ref) < 8:
        ref.append(next(ld))
        states.append(copy.deepcopy(ld.state_dict()))
        seen |= ((ref[-1]["epoch"] >= 1) & (ref[-1]["source"] == 0)).any(dim=1)
    tail = 6
    ref += [next(ld) for _ in range(tail)]
    ld.close()

    def epoch0(b):
        return int(b["epoch"][b["source"] == 0].max())

    mid_doc = next(k for k in range(2, len(ref)) if not ref[k]["reset"][:, 0].all())
    boundary = next(k for k in range(1, len(ref)) if epoch0(ref[k]) > epoch0(ref[k - 1]))
    points = {
        "start": 0,
        "mid-shard": 2,
        "mid-document": mid_doc,
        "epoch boundary": boundary,
        "after the boundary": boundary + 1,
        "late": len(states) - 1,
    }
    for i, (name, k) in enumerate(points.items()):
        state = pickle.loads(pickle.dumps(states[k]))
        resumed = build_train_loader(make_cfg(corpus, sources=cfg.sources, num_workers=[2, 0, 3][i % 3]), 0, 1)
        resumed.load_state_dict(state)
        got = [next(resumed) for _ in range(tail)]
        resumed.close()
        assert_batches_equal(got, ref[k : k + tail]), name


def test_state_survives_torch_save_and_json(corpus):
    cfg = make_cfg(corpus)
    ld = build_train_loader(cfg, 0, 1)
    for _ in range(5):
        next(ld)
    state = ld.state_dict()
    want = [next(ld) for _ in range(3)]
    ld.close()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    for restored in (torch.load(buf, weights_only=True), json.loads(json.dumps(state))):
        again = build_train_loader(cfg, 0, 1)
        again.load_state_dict(restored)
        assert_batches_equal([next(again) for _ in range(3)], want)
        again.close()


def test_elastic_two_one_four_ranks_continue_the_same_global_batches(corpus):
    cfg = make_cfg(corpus, global_lanes=8)
    single = build_train_loader(cfg, 0, 1)
    ref = [next(single) for _ in range(60)]  # crosses the first epoch boundary
    single.close()
    assert int(torch.stack([b["epoch"].max() for b in ref]).max()) >= 1

    two = [build_train_loader(cfg, r, 2) for r in range(2)]
    got = [concat_ranks([next(ld) for ld in two]) for _ in range(20)]
    with pytest.raises(ValueError, match="lacks lanes"):
        build_train_loader(cfg, 0, 1).load_state_dict(two[0].state_dict())
    state = merge_state_dicts([ld.state_dict() for ld in two])
    for ld in two:
        ld.close()

    one = build_train_loader(cfg, 0, 1)
    one.load_state_dict(state)
    got += [next(one) for _ in range(20)]
    state = one.state_dict()
    one.close()

    four = [build_train_loader(make_cfg(corpus, global_lanes=8, num_workers=1), r, 4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    got += [concat_ranks([next(ld) for ld in four]) for _ in range(20)]
    for ld in four:
        ld.close()
    assert_batches_equal(got, ref)


def test_resume_with_another_window_geometry_keeps_documents_whole(corpus):
    cfg = make_cfg(corpus, num_workers=0)
    ld = build_train_loader(cfg, 0, 1)
    batches = [next(ld) for _ in range(10)]
    wider = build_train_loader(make_cfg(corpus, num_workers=0, segment_length=32, n_segments=8), 0, 1)
    wider.load_state_dict(ld.state_dict())
    batches += run_until_epoch([wider], 1)
    assert epoch_documents(batches, range(4), 0) == Counter(corpus["ref"])


def test_sources_mix_by_token_weights(corpus, corpus_b):
    sources = [SourceConfig(corpus["dir"], 3.0), SourceConfig(corpus_b["dir"], 1.0)]
    cfg = make_cfg(corpus, num_workers=0, sources=sources)
    ld = build_train_loader(cfg, 0, 1)
    batches = [next(ld) for _ in range(600)]
    longest = max(len(r) for r in corpus["ref"] + corpus_b["ref"]) + 1
    for lane in range(4):
        per_source = Counter()
        for d in lane_documents(batches, lane):
            per_source[d["source"]] += len(d["tokens"]) + 1
        total = per_source[0] + per_source[1]
        # Each lane keeps within one document (plus the one still running) of the 3:1 token split.
        assert abs(per_source[0] - 0.75 * total) <= 2 * longest, (lane, per_source)
        assert total > 20 * longest
    # The smaller source wraps around into later epochs on its own.
    assert ld.stats()["epochs"][1][0] >= 1


def test_valid_fraction_splits_documents_and_valid_pass_is_finite_and_restartable(corpus):
    cfg = make_cfg(corpus, valid_fraction=0.25)
    train = [build_train_loader(cfg, r, 2) for r in range(2)]
    batches = run_until_epoch(train, 1)
    train_docs = epoch_documents(batches, range(4), 0)
    valid = [build_valid_loader(cfg, r, 2) for r in range(2)]
    assert len(valid[0]) == len(valid[1]) > 0
    passes = [[concat_ranks(list(step)) for step in zip(*valid)] for _ in range(2)]
    assert_batches_equal(passes[0], passes[1])
    valid_docs = epoch_documents(passes[0], range(4), 0)
    assert not set(valid_docs) & set(train_docs)
    assert train_docs + valid_docs == Counter(corpus["ref"])
    assert 10 < sum(valid_docs.values()) < 50
    assert train[0].stats()["filtered"][0]["held_out"] == sum(valid_docs.values())
    last = passes[0][-1]
    assert last["loss_mask"].sum() > 0, "the pass ends with the longest lane's last window"


def test_valid_sources_one_pass_each_document_once(corpus, corpus_b):
    cfg = make_cfg(corpus, valid_sources=[SourceConfig(corpus_b["dir"])], global_lanes=8)
    valid = build_valid_loader(cfg, 0, 1)
    batches = list(valid)
    assert len(batches) == len(valid)
    assert epoch_documents(batches, range(8), 0) == Counter(corpus_b["ref"])
    assert len(list(build_valid_loader(make_cfg(corpus, valid_sources=cfg.valid_sources, valid_batches=2), 0, 1))) == 2
    with pytest.raises(DataError, match="no validation data"):
        build_valid_loader(make_cfg(corpus), 0, 1)


def test_length_filters(corpus):
    cfg = make_cfg(corpus, min_doc_tokens=100, max_doc_tokens=1500)
    ld = build_train_loader(cfg, 0, 1)
    batches = run_until_epoch([ld], 1)
    want = Counter(r for r in corpus["ref"] if 100 <= len(r) <= 1500)
    assert epoch_documents(batches, range(4), 0) == want
    f = ld.stats()["filtered"][0]
    assert f["too_short"] == sum(len(r) < 100 for r in corpus["ref"])
    assert f["too_long"] == sum(len(r) > 1500 for r in corpus["ref"])
    ld.close()


def test_brace_pattern_and_pipe_urls_read_the_same(corpus):
    index = json.load(open(f"{corpus['dir']}/index.json"))
    last = len(index["shards"]) - 1
    pattern = f"{corpus['dir']}/shard-{{000000..{last:06d}}}.tar"
    plain = build_train_loader(make_cfg(corpus, num_workers=0), 0, 1)
    want = [next(plain) for _ in range(12)]
    for path in (pattern, f"pipe:cat {pattern}"):
        src = SourceConfig(path=path, index=f"{corpus['dir']}/index.json")
        ld = build_train_loader(make_cfg(corpus, sources=[src]), 0, 1)
        assert_batches_equal([next(ld) for _ in range(12)], want)
        ld.close()
    with pytest.raises(DataError, match="expands to"):
        build_train_loader(
            make_cfg(
                corpus,
                sources=[SourceConfig(path=f"{corpus['dir']}/shard-000000.tar", index=f"{corpus['dir']}/index.json")],
            ),
            0,
            1,
        )


def test_omegaconf_structured_config_works_as_is(corpus):
    cfg = make_cfg(corpus, num_workers=0)
    oc = OmegaConf.structured(cfg)
    a, b = build_train_loader(cfg, 0, 2), build_train_loader(oc, 0, 2)
    assert_batches_equal([next(a) for _ in range(3)], [next(b) for _ in range(3)])
    b.load_state_dict(a.state_dict())


def test_config_and_state_mismatches_are_clear_errors(corpus):
    with pytest.raises(ValueError, match="must divide"):
        build_train_loader(make_cfg(corpus), 0, 3)
    with pytest.raises(DataError, match="cannot fill 512 lanes"):
        build_train_loader(make_cfg(corpus, global_lanes=512), 0, 1)
    with pytest.raises(DataError, match="smaller than the tokenizer"):
        build_train_loader(make_cfg(corpus, vocab_size=100), 0, 1)
    state = build_train_loader(make_cfg(corpus), 0, 1).state_dict()
    with pytest.raises(ValueError, match="another data config.*seed"):
        build_train_loader(make_cfg(corpus, seed=8), 0, 1).load_state_dict(state)


def test_a_dropped_loader_is_freed_at_once_with_its_workers(corpus):
    before = set(multiprocessing.active_children())
    ld = build_train_loader(make_cfg(corpus), 0, 1)
    next(ld)
    workers = [w for w in multiprocessing.active_children() if w not in before]
    assert workers
    ref = weakref.ref(ld)
    del ld
    assert ref() is None, "no reference cycle may keep a loader (and its DataLoader workers) alive"
    # The loader's thread joins these workers too; two threads joining one process race on its exit
    # status (the loser reads it as alive), so wait for the exit itself: a process's sentinel becomes
    # ready when it ends.
    for w in workers:
        assert multiprocessing.connection.wait([w.sentinel], timeout=10), f"{w.name} must end with its loader"


def test_a_range_is_read_without_scanning_the_rest_of_its_shard(tmp_path, monkeypatch):
    from data_pipeline.make_shards import write_shards
    from data_pipeline.shards import BadSamples, open_shard_set, read_documents

    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(200)))
    write_shards([str(src)], str(tmp_path / "s"), progress=False)
    ss = open_shard_set(str(tmp_path / "s"))
    headers = Counter()
    real_next = tarfile.TarFile.next

    def counting_next(self):
        headers["n"] += 1
        return real_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    got = [p for p, _, _ in read_documents(ss, 0, np.arange(100, 103), 0, BadSamples("error"))]
    assert got == [0, 1, 2]
    assert headers["n"] <= 3 * 2 + 2, "seek to the range, stop right after it"


def _gather_on_rank(rank, world, corpus_dir):
    torch.distributed.init_process_group("gloo")
    ld = build_train_loader(make_cfg({"dir": corpus_dir}, num_workers=0), rank, world)
    for _ in range(5):
        next(ld)
    return gather_state_dict(ld)


def test_gather_state_dict_over_a_process_group_equals_a_single_rank_state(corpus):
    states = run_distributed(_gather_on_rank, 2, corpus["dir"], timeout=300)
    single = build_train_loader(make_cfg(corpus, num_workers=0), 0, 1)
    for _ in range(5):
        next(single)
    assert states[0] == states[1] == single.state_dict()


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Blocks TERM and USR1 in the main process as the trainer does, and exits with its loader still running:
# multiprocessing then terminates the workers.
LIVE_LOADER = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
from data_pipeline import DataConfig, SourceConfig, build_train_loader

loader = build_train_loader(
    DataConfig(sources=[SourceConfig(sys.argv[1])], segment_length=64, n_segments=4, num_workers=2, global_lanes=4),
    0,
    1,
)
next(loader)
print("reading", flush=True)
sys.stdin.readline()
next(loader)
print("still reading", flush=True)
"""


@pytest.mark.parametrize("group_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_workers_outlive_a_stop_sent_to_the_group_and_end_with_their_process(stdlib_shards, group_signal):
    process = subprocess.Popen(
        [sys.executable, "-c", LIVE_LOADER, stdlib_shards],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout.readline() == "reading\n", process.stderr.read()[-3000:]
        os.killpg(process.pid, group_signal)  # the process and its workers, as scancel does
        out, err = process.communicate("go\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert out == "still reading\n"
