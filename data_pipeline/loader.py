"""Train and validation loaders: batches of this data-parallel rank's lanes, with exact state."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig, validate
from .lanes import Cursor, Lane, Source
from .read_ahead import ReadAhead
from .shards import DataError, ShardSet, doc_key, held_out_unit, open_shard_set

log = logging.getLogger(__name__)

STATE_FORMAT = "infinitron-data-state"
STATE_VERSION = 1


class _Data:
    """The opened sources of one split with the documents that take part. Built once in the
    loader's process; forked workers inherit it."""

    def __init__(self, cfg: DataConfig, split: str):
        validate(cfg)
        self.cfg, self.split = cfg, split
        sets = [open_shard_set(s.path, s.index) for s in cfg.sources]
        valid_sets = [open_shard_set(s.path, s.index) for s in cfg.valid_sources]
        tok = {k: sets[0].tokenizer[k] for k in ("vocab_size", "pad_id", "eos_id")}
        for ss in sets + valid_sets:
            other = {k: ss.tokenizer[k] for k in tok}
            if other != tok:
                raise DataError(f"{ss.index_path}: tokenizer {other} differs from {sets[0].index_path}'s {tok}")
        self.vocab_size, self.pad_id, self.eos_id = tok["vocab_size"], tok["pad_id"], tok["eos_id"]
        self.token_dtype = np.dtype(sets[0].dtype)
        # Batches carry loss weights only when some source has weighted documents.
        self.weighted = any(ss.weighted_documents for ss in sets + valid_sets)
        if cfg.vocab_size and cfg.vocab_size < self.vocab_size:
            raise DataError(f"DataConfig.vocab_size {cfg.vocab_size} is smaller than the tokenizer's {self.vocab_size}")
        if cfg.append_eos and self.eos_id is None:
            raise DataError(f"{sets[0].index_path}: the tokenizer has no <eos>; set append_eos=False")
        # The hash split holds documents out of `sources` only while no valid_sources are given.
        hash_split = cfg.valid_fraction > 0 and not cfg.valid_sources
        keep_held: Optional[bool]
        if split == "train":
            chosen, weights, labels = sets, [s.weight for s in cfg.sources], [s.path for s in cfg.sources]
            keep_held = False if hash_split else None
        elif valid_sets:
            chosen, weights, labels = valid_sets, [1.0] * len(valid_sets), [s.path for s in cfg.valid_sources]
            keep_held = None
        elif hash_split:
            chosen, weights, labels = sets, [1.0] * len(sets), [s.path for s in cfg.sources]
            keep_held = True
        else:
            raise DataError("no validation data: set DataConfig.valid_sources or valid_fraction")
        train = split == "train"
        self.weights = weights
        self.filtered: List[dict] = []
        self.sources: List[Source] = []
        for k, (ss, label) in enumerate(zip(chosen, labels)):
            mask = self._mask(ss, label, keep_held)
            self.sources.append(
                Source(
                    ss,
                    k,
                    mask,
                    cfg.append_eos,
                    cfg.seed,
                    cfg.global_lanes,
                    shuffle=train,
                    fill_every_lane=train,
                    label=label,
                )
            )
            missing = ss.missing_local_shards()
            if missing:
                msg = f"source {label}: {len(missing)} missing shard(s), e.g. {missing[0]}"
                if cfg.on_bad_sample == "error":
                    raise DataError(msg)
                log.warning("%s; their documents will be skipped and counted", msg)
        self.fingerprint = {
            "split": split,
            "sources": [[s.ss.dataset_id, float(w)] for s, w in zip(self.sources, weights)],
            **{
                k: getattr(cfg, k)
                for k in ("seed", "global_lanes", "shuffle_buffer", "min_doc_tokens", "max_doc_tokens", "append_eos")
            },
            "valid_fraction": cfg.valid_fraction if hash_split else 0.0,
        }

    def _mask(self, ss: ShardSet, label: str, keep_held: Optional[bool]) -> np.ndarray:
        cfg = self.cfg
        lens = np.asarray(ss.doc_tokens)
        empty = lens == 0
        if empty.any():
            d = int(np.flatnonzero(empty)[0])
            shard = int(np.searchsorted(ss.first_doc, d, side="right")) - 1
            msg = (
                f"{ss.index_path}: {int(empty.sum())} empty document(s), e.g. shard {ss.urls[shard]} "
                f"document {doc_key(d - int(ss.first_doc[shard]))}"
            )
            if cfg.on_bad_sample == "error":
                raise DataError(msg + " (set on_bad_sample='skip' to skip and count them)")
            log.warning("%s; skipping them", msg)
        short = ~empty & (lens < cfg.min_doc_tokens)
        long = lens > cfg.max_doc_tokens if cfg.max_doc_tokens else np.zeros(len(lens), dtype=bool)
        mask = ~(empty | short | long)
        stats = {
            "source": label,
            "documents": len(lens),
            "empty": int(empty.sum()),
            "too_short": int(short.sum()),
            "too_long": int(long.sum()),
        }
        if keep_held is not None:
            held = (
                np.concatenate([held_out_unit(n, int(c)) for n, c in zip(ss.names, ss.n_docs)] or [np.zeros(0)])
                < self.cfg.valid_fraction
            )
            stats["held_out" if not keep_held else "not_held_out"] = int((mask & (held != keep_held)).sum())
            mask &= held == keep_held
        stats["used"] = int(mask.sum())
        self.filtered.append(stats)
        return mask

    def make_lane(self, lane_id: int, state: Optional[dict]) -> Lane:
        train = self.split == "train"
        block = self.cfg.shuffle_buffer if train else 1
        cursors = [
            Cursor(
                src,
                lane_id,
                block,
                shuffle=train and block > 1,
                one_pass=not train,
                on_bad=self.cfg.on_bad_sample,
                state=state["cursors"][k] if state else None,
            )
            for k, src in enumerate(self.sources)
        ]
        eos = self.eos_id if self.cfg.append_eos else None
        return Lane(lane_id, cursors, self.weights, eos, one_pass=not train, state=state)

    def windows_per_lane(self) -> np.ndarray:
        """Windows each global lane needs for one pass (one-pass split), from the index alone."""
        cfg = self.cfg
        out = np.zeros(cfg.global_lanes, dtype=np.int64)
        for lane in range(cfg.global_lanes):
            segs = 0
            for src in self.sources:
                for shard, docs in src.pieces(0, lane):
                    lens = src.eff_len[int(src.ss.first_doc[shard]) + docs]
                    segs += int(((lens + cfg.segment_length - 1) // cfg.segment_length).sum())
            out[lane] = math.ceil(segs / cfg.n_segments)
        return out


class _Packing:
    """The layout of one worker item: a single uint8 buffer with typed views. A DataLoader worker
    sends each tensor through its own shared-memory segment, at a fixed cost about that of a
    megabyte of data, so one compact buffer (token ids in the shard dtype, a uint8 mask, float32
    loss weights only when the data has any) beats the seven int64/float32 tensors of a batch by
    far; the main process expands it."""

    def __init__(self, n_lanes: int, seg_len: int, n_segments: int, token_dtype: np.dtype, weighted: bool):
        width = seg_len * n_segments
        fields = [
            ("epoch", np.int32, (n_lanes, n_segments)),
            ("source", np.int32, (n_lanes, n_segments)),
            ("tokens", token_dtype, (n_lanes, width)),
            ("carry", token_dtype, (n_lanes,)),
            ("weight", np.float32, (n_lanes, width if weighted else 0)),
            ("mask", np.uint8, (n_lanes, width)),
            ("reset", np.bool_, (n_lanes, n_segments)),
        ]
        self.fields, off = [], 0
        for name, dtype, shape in fields:
            dtype = np.dtype(dtype)
            off = -(-off // dtype.alignment) * dtype.alignment
            self.fields.append((name, off, dtype, shape))
            off += dtype.itemsize * int(np.prod(shape))
        self.size = off

    def views(self, buf: np.ndarray) -> Dict[str, np.ndarray]:
        return {
            name: buf[off : off + dtype.itemsize * int(np.prod(shape))].view(dtype).reshape(shape)
            for name, off, dtype, shape in self.fields
        }


class _LaneDataset(IterableDataset):
    """Yields, per step, the windows of one worker's share of the rank's lanes (a contiguous run,
    so the workers' items in worker order hold the rank's lanes in order), packed, with every
    lane's state after the step attached."""

    def __init__(
        self, data: _Data, lanes: List[int], states: Dict[int, Optional[dict]], workers: int, n_batches: Optional[int]
    ):
        self.data, self.lanes, self.states, self.workers, self.n_batches = data, lanes, states, workers, n_batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = np.array_split(np.asarray(self.lanes, dtype=np.int64), max(self.workers, 1))[info.id if info else 0]
        lanes = [self.data.make_lane(int(i), self.states.get(int(i))) for i in mine]
        cfg, pad = self.data.cfg, self.data.pad_id
        pack = _Packing(len(lanes), cfg.segment_length, cfg.n_segments, self.data.token_dtype, self.data.weighted)
        step = 0
        try:
            while self.n_batches is None or step < self.n_batches:
                buf = np.empty(pack.size, dtype=np.uint8)
                v = pack.views(buf)
                v["tokens"].fill(pad)
                v["mask"].fill(0)
                v["weight"].fill(0)
                v["reset"].fill(False)
                v["epoch"].fill(-1)
                v["source"].fill(-1)
                for r, lane in enumerate(lanes):
                    weight = v["weight"][r] if self.data.weighted else None
                    v["carry"][r] = lane.fill(
                        cfg.segment_length,
                        v["tokens"][r],
                        v["mask"][r],
                        weight,
                        v["reset"][r],
                        v["epoch"][r],
                        v["source"][r],
                        pad,
                    )
                yield {
                    "packed": torch.from_numpy(buf),
                    "n": len(lanes),
                    "_states": {int(l.lane_id): l.state() for l in lanes},
                    "_bad": {int(l.lane_id): l.bad_counts() for l in lanes},
                }
                step += 1
        finally:
            for lane in lanes:
                lane.close()


def _stop_on_the_trainers_term_only(worker_id: int) -> None:
    """USR1 and TERM sent to a whole process group or SLURM step (scancel, a time limit, torchrun,
    `timeout`) reach the workers too; the main process decides when to stop and shuts them down, so a
    worker ignores them. A TERM from the main process itself (multiprocessing's ``terminate`` of workers
    left running when it exits) ends the worker: ignoring that one would hang the exit."""
    stop_signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    trainer = os.getppid()

    def receive() -> None:
        while True:
            info = signal.sigwaitinfo(stop_signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == trainer:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=receive, name="stop-signals", daemon=True).start()


def _start(ds: _LaneDataset, workers: int, cfg: DataConfig) -> Iterator[dict]:
    if workers == 0:
        return iter(ds)
    # fork: workers inherit the opened indexes; timeout: a stuck worker becomes an error.
    return iter(
        DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=cfg.prefetch,
            multiprocessing_context="fork",
            timeout=cfg.worker_timeout_s,
            worker_init_fn=_stop_on_the_trainers_term_only,
        )
    )


def _close(it: Optional[Iterator[dict]]) -> None:
    # A DataLoader iterator shuts its workers down when it is released.
    close = getattr(it, "close", None)
    if close is not None:
        close()


class _Progress:
    """What the consumer has been handed: lane states after the last batch, skip counts, steps.
    `_hand_out` updates it; the batch generator holds no reference to it or to its loader: a
    loader/generator cycle would keep a dropped loader's DataLoader alive until a later garbage
    collection, which may then run inside another loader's freshly forked worker."""

    def __init__(self, states: Dict[int, dict], step: int):
        self.states, self.step = states, step
        self.bad: Dict[int, Dict[str, int]] = {}


def _assemble(data: _Data, lane_ids: List[int], parts: List[dict]) -> dict:
    """The rank's batch from the workers' packed items (in lane order)."""
    cfg = data.cfg
    n, width, segs = sum(p["n"] for p in parts), cfg.segment_length * cfg.n_segments, cfg.n_segments
    tokens, labels = np.empty((n, width), dtype=np.int64), np.empty((n, width), dtype=np.int64)
    labelled, reset = np.empty((n, width), dtype=bool), np.empty((n, segs), dtype=bool)
    mask = np.empty((n, width), dtype=np.float32)
    epoch, source = np.empty((n, segs), dtype=np.int64), np.empty((n, segs), dtype=np.int64)
    r = 0
    for p in parts:
        v = _Packing(p["n"], cfg.segment_length, segs, data.token_dtype, data.weighted).views(p["packed"].numpy())
        rows = slice(r, r + p["n"])
        tokens[rows], labelled[rows], reset[rows] = v["tokens"], v["mask"], v["reset"]
        mask[rows] = v["weight"] if data.weighted else v["mask"]
        epoch[rows], source[rows] = v["epoch"], v["source"]
        # Within a window the next token of a document is the next position (documents run on
        # across segments); the window's last position carries its label separately.
        labels[rows, :-1] = v["tokens"][:, 1:]
        labels[rows, -1] = v["carry"]
        r += p["n"]
    # By whether a label exists, not by its weight: a token of weight 0 keeps its label.
    labels[~labelled] = data.pad_id
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "reset": torch.from_numpy(reset),
        "lane_ids": torch.tensor(lane_ids, dtype=torch.int64),
        "epoch": torch.from_numpy(epoch),
        "source": torch.from_numpy(source),
    }


def _batches(
    data: _Data, lane_ids: List[int], workers: int, progress: _Progress, n_batches: Optional[int]
) -> Iterator[Tuple[dict, List[dict]]]:
    """Batches from progress.states on, each with its workers' items' lane states: `_hand_out` records
    those in progress as the batch is handed out, so progress describes the batches consumed,
    whatever was read ahead. The workers start here, in the caller's thread."""
    it = _start(_LaneDataset(data, lane_ids, dict(progress.states), workers, n_batches), workers, data.cfg)
    return _assembled(data, lane_ids, workers, it)


def _assembled(data: _Data, lane_ids: List[int], workers: int, it: Iterator[dict]) -> Iterator[Tuple[dict, List[dict]]]:
    try:
        while True:
            parts = []
            for _ in range(max(workers, 1)):
                part = next(it, None)
                if part is None:
                    return
                parts.append(part)
            yield _assemble(data, lane_ids, parts), [{"states": p["_states"], "bad": p["_bad"]} for p in parts]
    finally:
        _close(it)
        del it


def _hand_out(progress: _Progress, item: Tuple[dict, List[dict]]) -> dict:
    batch, parts = item
    for part in parts:
        progress.states.update(part["states"])
        progress.bad.update(part["bad"])
    progress.step += 1
    return batch


class _RankLoader:
    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int, split: str):
        if dp_size < 1 or cfg.global_lanes % dp_size:
            raise ValueError(f"dp_size {dp_size} must divide global_lanes {cfg.global_lanes}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self._data = _Data(cfg, split)
        per = cfg.global_lanes // dp_size
        self.lane_ids = list(range(dp_rank * per, (dp_rank + 1) * per))
        self._workers = min(cfg.num_workers, per)
        self._progress = _Progress(self._fresh_states(), 0)

    def _fresh_states(self) -> Dict[int, dict]:
        return {i: self._data.make_lane(i, None).state() for i in self.lane_ids}

    @property
    def step(self) -> int:
        """Batches handed out (since the start of training, or of this validation pass)."""
        return self._progress.step

    @property
    def vocab_size(self) -> int:
        return self._data.vocab_size

    @property
    def pad_id(self) -> int:
        return self._data.pad_id

    @property
    def eos_id(self) -> Optional[int]:
        return self._data.eos_id

    def stats(self) -> dict:
        """Counts for this rank's lanes: documents started, tokens and padding delivered, samples
        skipped (by reason, on_bad_sample='skip'), per-source filter counts, epochs reached."""
        prog = self._progress
        skipped: Dict[str, int] = {}
        for i in self.lane_ids:
            for k, v in (prog.bad.get(i) or _snapshot_bad(prog.states[i])).items():
                skipped[k] = skipped.get(k, 0) + v
        states = [prog.states[i] for i in self.lane_ids]
        return {
            "step": prog.step,
            "documents": sum(s["docs"] for s in states),
            "tokens": sum(s["tokens"] for s in states),
            "padding": sum(s["pad"] for s in states),
            "skipped": skipped,
            "filtered": self._data.filtered,
            "epochs": [
                [min(s["cursors"][k]["epoch"] for s in states), max(s["cursors"][k]["epoch"] for s in states)]
                for k in range(len(self._data.sources))
            ],
        }


class TrainLoader(_RankLoader):
    """Endless training batches of this rank's lanes. Iterate it, or call next_batch(); the batch
    after the one handed out is read and assembled in a thread meanwhile (ReadAhead).

    Batch (torch tensors; n = global_lanes / dp_size lanes, in global lane order; W = n_segments *
    segment_length): tokens int64 [n, W]; labels int64 [n, W] (the next token of the same document,
    pad_id where there is none); loss_mask float32 [n, W] (0 on padding and on each document's last
    token); reset bool [n, n_segments] (a document starts at this segment); lane_ids int64 [n];
    epoch, source int64 [n, n_segments] (the epoch and source index of the segment's document,
    -1 for a segment of padding only)."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int):
        super().__init__(cfg, dp_rank, dp_size, "train")
        self._it: Optional[ReadAhead] = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        return self.next_batch()

    def next_batch(self) -> dict:
        if self._it is None:
            # The next batch is read and assembled while the caller trains on this one.
            batches = _batches(self._data, self.lane_ids, self._workers, self._progress, None)
            self._it = ReadAhead(batches, name=f"read-ahead-rank{self.dp_rank}")
        try:
            return _hand_out(self._progress, next(self._it))
        except BaseException:
            # The reading is finished now; a retry restarts from the last batch handed out.
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers and drop what was read ahead; the next batch restarts them from the
        current state."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def state_dict(self) -> dict:
        """The position after the last batch returned: plain python (picklable, torch.save-able)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self._data.fingerprint,
            "step": self.step,
            "lanes": {i: self._progress.states[i] for i in self.lane_ids},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. It may come from another dp_size (same global_lanes); it must hold
        this rank's lanes, so for a change of dp_size pass the merged state of all old ranks
        (gather_state_dict / merge_state_dicts)."""
        _check_state(state, self._data.fingerprint)
        lanes = {int(k): v for k, v in state["lanes"].items()}
        missing = [i for i in self.lane_ids if i not in lanes]
        if missing:
            raise ValueError(
                f"data state lacks lanes {missing[:8]}{'...' if len(missing) > 8 else ''} of rank "
                f"{self.dp_rank}/{self.dp_size}; load the merged state of all ranks "
                "(data_pipeline.gather_state_dict or merge_state_dicts)"
            )
        self.close()
        self._progress = _Progress({i: lanes[i] for i in self.lane_ids}, int(state["step"]))


class ValidLoader(_RankLoader):
    """One pass over the validation documents; each iteration starts from the beginning. All ranks
    get the same number of batches (len(loader)), computed from the index: the pass ends when the
    longest global lane is through (or after valid_batches); exhausted lanes yield padding."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int):
        super().__init__(cfg, dp_rank, dp_size, "valid")
        self.n_batches = int(self._data.windows_per_lane().max())
        if self.n_batches == 0:
            raise DataError(f"the validation split is empty ({self._data.filtered})")
        if cfg.valid_batches:
            self.n_batches = min(self.n_batches, cfg.valid_batches)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict]:
        progress = self._progress = _Progress(self._fresh_states(), 0)
        return (
            _hand_out(progress, item)
            for item in _batches(self._data, self.lane_ids, self._workers, progress, self.n_batches)
        )


def _snapshot_bad(state: dict) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for c in state["cursors"]:
        for k, v in c["bad"].items():
            out[k] = out.get(k, 0) + v
    return out


def _check_state(state: dict, fingerprint: dict) -> None:
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} state")
    theirs = state["fingerprint"]
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if _plain(theirs.get(k)) != _plain(v)}
    if diff:
        raise ValueError(f"data state was saved with another data config (saved, now): {diff}")


def _plain(x):
    """Tuples and lists compare equal (a state may have been through JSON or OmegaConf)."""
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def merge_state_dicts(states: List[dict]) -> dict:
    """One state holding the lanes of several ranks' states (same step and config)."""
    if not states:
        raise ValueError("no states to merge")
    first = states[0]
    lanes: Dict[int, dict] = {}
    for s in states:
        _check_state(s, first["fingerprint"])
        if s["step"] != first["step"]:
            raise ValueError(f"states are from different steps ({first['step']} and {s['step']})")
        for k, v in s["lanes"].items():
            if int(k) in lanes and lanes[int(k)] != v:
                raise ValueError(f"two states disagree on lane {k}")
            lanes[int(k)] = v
    return {**first, "lanes": dict(sorted(lanes.items()))}


def gather_state_dict(loader: TrainLoader, group=None) -> dict:
    """The merged state of every rank's loader (a collective over `group`, e.g. the data-parallel
    group; ranks holding the same lanes, such as TP peers, are merged). Without torch.distributed
    initialised, this loader's own state."""
    state = loader.state_dict()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return state
    gathered: List[Optional[dict]] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, state, group=group)
    return merge_state_dicts([g for g in gathered if g is not None])


def build_train_loader(cfg: DataConfig, dp_rank: int, dp_size: int) -> TrainLoader:
    return TrainLoader(cfg, dp_rank, dp_size)


def build_valid_loader(cfg: DataConfig, dp_rank: int, dp_size: int) -> ValidLoader:
    return ValidLoader(cfg, dp_rank, dp_size)
