"""Sharded checkpoints that resume exactly: saving, and restoring a run (the layout: training/checkpoint_layout.py).

Saving is atomic: everything goes to ``.tmp-step_<N>/``, is flushed, and the directory is renamed;
the ``latest`` pointer is replaced afterwards. A process killed at any moment leaves the previous
checkpoint loadable, and ``resume: auto`` skips anything without a complete manifest. Each rank
computes the CRC-32 of the files it writes while writing them (training/checkpoint_io.py); the manifest
records them, and a resume checks every file against it (the ranks share the reading) before loading.

An asynchronous save (``checkpoint.async_save``) pauses training only to snapshot the state to host
memory (training/async_checkpoint.py); a background thread per rank writes and flushes the files.
At each step boundary while it is pending, the ranks agree (one small all-reduce on a gloo group)
whether every writer is done; then the checkpoint is finalized as above. A writer's failure stops
training with an error naming the file, and that checkpoint is never finalized.

Resuming on another layout (tensor, pipeline, virtual pipeline, data- and/or context-parallel size) is
``training.reshard``'s: weights, optimizer state, carried memory and data positions are mapped through
global names (ZeRO-1/2; ZeRO-3 fails with a message).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

from training.async_checkpoint import SnapshottingCheckpointEngine, snapshot_to_host
from training.checkpoint_io import ChecksummingCheckpointEngine, file_crc32, save_with_crc32
from training.checkpoint_layout import (
    CONFIG,
    DEEPSPEED_TAG,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    CheckpointError,
    check_format,
    coordinates,
    layout,
    list_checkpoints,
    list_files,
    list_unfinished,
    manifest_files,
    parallel_sizes,
    rank_file,
    read_rank_state,
    resume_candidates,
    step_dir_name,
    step_of,
    verify,
)
from training.config import ConfigError, TrainConfig, save_resolved
from training.reshard import load_resharded
from training.rng import rng_state, set_rng_state


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class SaveReport:
    """A finalized save, as the run logs it."""

    path: str
    step: int
    reason: str
    asynchronous: bool
    blocking_seconds: float
    """Training was paused this long (including waiting for the previous save to finish)."""
    write_seconds: float
    """Until every rank's files were written and flushed."""
    seconds: float
    """Until the checkpoint was finalized (manifest, rename, ``latest``)."""
    size_bytes: int
    """The whole checkpoint; counted on rank 0 only (0 elsewhere)."""

    def metrics(self) -> dict:
        gigabytes = self.size_bytes / 1e9
        return {
            "checkpoint/step": self.step,
            "checkpoint/async": int(self.asynchronous),
            "checkpoint/blocking_seconds": self.blocking_seconds,
            "checkpoint/write_seconds": self.write_seconds,
            "checkpoint/seconds": self.seconds,
            "checkpoint/gb": gigabytes,
            "checkpoint/gb_per_s": gigabytes / max(self.write_seconds, 1e-9),
        }


@dataclass
class _SaveInProgress:
    step: int
    reason: str
    tmp: str
    final: str
    started: float
    asynchronous: bool
    blocking_seconds: float = 0.0
    writing: Optional[Future] = None
    """The background writer's job: resolves to the time its last file was flushed."""


@dataclass
class _InjectedWriterFaults:
    delay_seconds: float = 0.0
    kill_after_first_file: bool = False
    fail_first_file: bool = False


def _write_snapshots(
    files: List[Tuple[str, object]], zipfile_serialization: bool, step: int, faults: _InjectedWriterFaults
) -> Tuple[float, Dict[str, int]]:
    """The background writer: torch.save and fsync each file; returns when the last one was flushed, and
    each file's CRC-32."""
    time.sleep(faults.delay_seconds)
    checksums = {}
    for index, (path, state) in enumerate(files):
        try:
            if faults.fail_first_file and index == 0:
                raise OSError("injected writer failure (debug.inject_writer_failure_at_steps)")
            checksums[path] = save_with_crc32(state, path, zipfile_serialization)
        except Exception as error:
            raise CheckpointError(
                f"checkpoint writer failed writing {path}: {error!r}; the checkpoint of step {step} "
                "was not finalized (the previous one stays the latest)"
            ) from error
        if faults.kill_after_first_file:
            os.kill(os.getpid(), signal.SIGKILL)
    return time.perf_counter(), checksums


# Writer states, all-reduced with MIN: one failure or one writer still busy decides for all ranks.
_WRITER_FAILED, _WRITER_BUSY, _WRITER_DONE = -1.0, 0.0, 1.0


@dataclass
class VerifiedCheckpoint:
    path: str
    manifest: dict


def verify_on_every_rank(path: str) -> VerifiedCheckpoint:
    """``verify`` with the checksums shared out over the ranks (collective); every rank raises the same error,
    naming each bad file found."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        manifest, problem = verify(path, (rank, world)), None
    except CheckpointError as error:
        manifest, problem = None, str(error)
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    found = list(dict.fromkeys(p for p in problems if p is not None))
    if found:
        raise CheckpointError("; ".join(found))
    return VerifiedCheckpoint(path, manifest)


def checkpoints_root(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")


def resume_point(cfg, announce: Callable[[str], None]) -> Optional[VerifiedCheckpoint]:
    """The checkpoint a run resumes from, verified (collective): the path given, the newest that verifies
    ('auto'; each one skipped goes to ``announce`` with the reason), or none (a fresh start: see
    ``clear_for_fresh_start``)."""
    resume = cfg.checkpoint.resume
    if resume is None:
        return None
    if resume != "auto":
        if not os.path.exists(resume):
            raise CheckpointError(f"checkpoint.resume={resume}: the path does not exist")
        return verify_on_every_rank(resume)
    root = checkpoints_root(cfg)
    for path in list_unfinished(root):
        announce(f"checkpoint.resume=auto: skipping {path}: an unfinished save (never finalized)")
    skipped = []
    for path in resume_candidates(root):
        try:
            return verify_on_every_rank(path)
        except CheckpointError as error:
            announce(f"checkpoint.resume=auto: skipping {path}: {error}")
            skipped.append(path)
    if skipped:
        raise CheckpointError(
            f"checkpoint.resume=auto: no checkpoint in {root} verifies (skipped {len(skipped)}, "
            "reasons above); remove or repair them, resume from a path (checkpoint.resume=PATH), "
            "or start over (checkpoint.start_over=true instead of checkpoint.resume)"
        )
    return None


def clear_for_fresh_start(cfg, announce: Callable[[str], None]) -> None:
    """A run that does not resume must not save among another run's checkpoints (collective): it refuses to
    start unless ``checkpoint.start_over`` is set, which removes them (rank 0)."""
    root = checkpoints_root(cfg)
    existing = list_checkpoints(root)
    if not existing:
        return
    if not cfg.checkpoint.start_over:
        raise ConfigError(
            f"{root} holds the checkpoints of an earlier run ({len(existing)}, the newest "
            f"{os.path.basename(existing[-1])}); resume it with checkpoint.resume=auto, or start over "
            "with checkpoint.start_over=true (removes them)"
        )
    dist.barrier()  # every rank has looked before rank 0 removes anything
    if dist.get_rank() == 0:
        for path in existing + list_unfinished(root):
            shutil.rmtree(path)
        if os.path.exists(os.path.join(root, LATEST)):
            os.remove(os.path.join(root, LATEST))
        announce(f"checkpoint.start_over=true: removed {len(existing)} checkpoints of an earlier run from {root}")
    dist.barrier()


class Stateful(Protocol):
    """A piece of a run that a rank file keeps: ``state_dict`` is what it stores under the piece's name."""

    def state_dict(self): ...

    def load_state_dict(self, state) -> None: ...


class CheckpointManager:
    """Saves and restores a run's state; every rank calls save/load (they are collective).

    A checkpoint holds the DeepSpeed engine (model, optimizer, LR schedule) and per rank a file of its
    coordinates, lanes and RNG states, and of ``states``: each named object's ``state_dict`` under its name
    (the carried memory, the data loader's position, the progress counters, the W&B run id). Each
    finalized save is handed to ``on_save``. ``model`` is this rank's stage of the model the engine wraps:
    a checkpoint of another layout is mapped onto its parameters (``training.reshard``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        engine,
        model,
        lane_ids: List[int],
        states: Dict[str, Stateful],
        on_save: Callable[[SaveReport], None],
    ):
        self.cfg = cfg
        self.engine = engine
        self.model = model
        self.lane_ids = list(lane_ids)
        self.states = states
        self.on_save = on_save
        self.root = checkpoints_root(cfg)
        self.keep_last = cfg.checkpoint.keep_last
        self.keep_every = cfg.checkpoint.keep_every
        # DeepSpeed builds its own engine from this config: the files get the same serialization.
        self._checksumming_engine = ChecksummingCheckpointEngine(engine._config)
        # Created by the first asynchronous save.
        self._writer: Optional[ThreadPoolExecutor] = None
        self._writer_status_group = None
        self._snapshotting_engine: Optional[SnapshottingCheckpointEngine] = None
        self._pending: Optional[_SaveInProgress] = None

    def last_saved_step(self) -> Optional[int]:
        paths = list_checkpoints(self.root)
        return step_of(paths[-1]) if paths else None

    # -- saving -------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        """This rank's part of a checkpoint beyond DeepSpeed's."""
        return {
            "coordinates": coordinates(),
            "lane_ids": self.lane_ids,
            "rng": rng_state(),
            **{name: piece.state_dict() for name, piece in self.states.items()},
        }

    def save(self, step: int, reason: str = "interval", asynchronous: bool = False) -> None:
        """Collective. Waits for a pending asynchronous save first. A synchronous save is finalized
        on return; an asynchronous one returns once the state is snapshotted, and ``poll``/``wait``
        finalize it. Each finalized save goes to ``on_save``."""
        started = time.perf_counter()
        self.wait()
        save = _SaveInProgress(
            step,
            reason,
            os.path.join(self.root, ".tmp-" + step_dir_name(step)),
            os.path.join(self.root, step_dir_name(step)),
            started,
            asynchronous,
        )
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(save.tmp, ignore_errors=True)
            os.makedirs(save.tmp)
            save_resolved(self.cfg, os.path.join(save.tmp, CONFIG))
        dist.barrier()
        rank_path = rank_file(save.tmp, rank)
        kill_midway = step in self.cfg.debug.inject_kill_during_save_at_steps and rank == 0
        if asynchronous:
            self._start_writing(save, rank_path, kill_midway)
            return
        self._save_through(self._checksumming_engine, save.tmp)
        checksums = self._checksumming_engine.take_checksums()
        checksums[rank_path] = save_with_crc32(
            self.rank_state(), rank_path, self._checksumming_engine.zipfile_serialization
        )
        if kill_midway:
            os.kill(os.getpid(), signal.SIGKILL)
        self._finalize(save, time.perf_counter() - save.started, checksums)

    def _save_through(self, checkpoint_engine, path: str) -> None:
        """DeepSpeed's save_checkpoint, its files going through ``checkpoint_engine``."""
        engine = self.engine
        live_engine = engine.checkpoint_engine
        engine.checkpoint_engine = checkpoint_engine
        try:
            engine.save_checkpoint(path, tag=DEEPSPEED_TAG, save_latest=False)
        finally:
            engine.checkpoint_engine = live_engine

    def _start_writing(self, save: _SaveInProgress, rank_path: str, kill_midway: bool) -> None:
        """Snapshot DeepSpeed's files and the rank state on this thread; write them on the writer's."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
            # gloo: a CPU flag needs no device synchronisation, whatever the training backend.
            self._writer_status_group = dist.new_group(backend="gloo")
            self._snapshotting_engine = SnapshottingCheckpointEngine(self.engine._config)
        self._save_through(self._snapshotting_engine, save.tmp)
        files = self._snapshotting_engine.take_files()
        files.append((rank_path, snapshot_to_host(self.rank_state())))
        cfg = self.cfg.debug
        first_rank = dist.get_rank() == 0
        faults = _InjectedWriterFaults(
            delay_seconds=cfg.inject_writer_delay_s,
            kill_after_first_file=kill_midway,
            fail_first_file=first_rank and save.step in cfg.inject_writer_failure_at_steps,
        )
        save.writing = self._writer.submit(
            _write_snapshots, files, self._snapshotting_engine.zipfile_serialization, save.step, faults
        )
        save.blocking_seconds = time.perf_counter() - save.started
        self._pending = save

    def poll(self) -> None:
        """At a step boundary: finalize the pending save if every rank's writer is done.

        Collective while a save is pending (a small all-reduce); nothing at all otherwise."""
        if self._pending is not None:
            self._settle(block=False)

    def wait(self) -> None:
        """Finalize the pending save, if any, once every rank's writer is done (collective)."""
        if self._pending is not None:
            self._settle(block=True)

    def _settle(self, block: bool) -> None:
        save = self._pending
        if block:
            wait_for_futures([save.writing])
        if not save.writing.done():
            local = _WRITER_BUSY
        elif save.writing.exception() is not None:
            local = _WRITER_FAILED
        else:
            local = _WRITER_DONE
        # MIN: the worst state decides.
        status = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(status, op=dist.ReduceOp.MIN, group=self._writer_status_group)
        state = status.item()
        if state == _WRITER_BUSY:
            return
        self._pending = None
        if state == _WRITER_FAILED:
            if local == _WRITER_FAILED:
                save.writing.result()  # raises the writer's CheckpointError, which names the file
            raise CheckpointError(
                f"another rank's checkpoint writer failed (see its error); the checkpoint of step "
                f"{save.step} in {save.tmp} was not finalized"
            )
        flushed_at, checksums = save.writing.result()
        self._finalize(save, flushed_at - save.started, checksums)

    def _finalize(self, save: _SaveInProgress, write_seconds: float, checksums: Dict[str, int]) -> None:
        """Once every rank's files are written and flushed (``write_seconds`` after the save started, with
        ``checksums``: path -> CRC-32): rank 0 gathers the checksums, flushes and checksums the files no writer
        did (config.yaml, DeepSpeed's recovery script), writes the manifest, renames, points ``latest`` at it
        and prunes; all ranks wait for that."""
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(
            gathered, (write_seconds, {os.path.relpath(path, save.tmp): crc for path, crc in checksums.items()})
        )
        write_seconds = max(seconds for seconds, _ in gathered)
        if rank == 0:
            sizes = list_files(save.tmp)
            all_checksums = {rel: crc for _, part in gathered for rel, crc in part.items()}
            for rel in sizes.keys() - all_checksums.keys():
                _fsync_file(os.path.join(save.tmp, rel))
                all_checksums[rel] = file_crc32(os.path.join(save.tmp, rel))
            manifest = {
                "format": FORMAT_VERSION,
                "step": save.step,
                "reason": save.reason,
                "layout": layout(),
                "zero_stage": self.cfg.parallel.zero_stage,
                "global_lanes": self.cfg.data.global_lanes,
                "files": manifest_files(sizes, all_checksums),
                "saved_at": time.time(),
            }
            _write_atomic(os.path.join(save.tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
            if os.path.exists(save.final):
                shutil.rmtree(save.final)
            os.replace(save.tmp, save.final)
            _fsync_dir(self.root)
            _write_atomic(os.path.join(self.root, LATEST), step_dir_name(save.step).encode())
            self._prune(save.final)
        dist.barrier()
        seconds = time.perf_counter() - save.started
        self.on_save(
            SaveReport(
                path=save.final,
                step=save.step,
                reason=save.reason,
                asynchronous=save.asynchronous,
                blocking_seconds=save.blocking_seconds if save.asynchronous else seconds,
                write_seconds=write_seconds,
                seconds=seconds,
                size_bytes=sum(list_files(save.final).values()) if rank == 0 else 0,
            )
        )

    def close(self) -> None:
        """Stop the writer thread once it has written the save in hand; a pending save stays unfinalized."""
        if self._writer is not None:
            self._writer.shutdown(wait=True, cancel_futures=True)

    def _prune(self, saved: str) -> None:
        """Keep the newest keep_last, every keep_every-th, and the one just saved (a run resumed from an older
        checkpoint saves below the newest)."""
        paths = list_checkpoints(self.root)
        keep = set(paths[-self.keep_last :]) | {saved}
        for path in paths:
            step = step_of(path)
            if path not in keep and not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(path, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------
    def load(self, checkpoint: VerifiedCheckpoint) -> None:
        """Restore the engine and every rank's state from ``checkpoint`` (collective); a checkpoint saved on
        another layout goes through ``training.reshard``."""
        path, manifest = checkpoint.path, checkpoint.manifest
        check_format(path, manifest)
        saved, now = manifest["layout"], layout()
        global_lanes = self.cfg.data.global_lanes
        if manifest["global_lanes"] != global_lanes:
            raise CheckpointError(
                f"{path} was saved with data.global_lanes={manifest['global_lanes']}; this run has "
                f"{global_lanes}: the lanes (and their memory) would not continue"
            )
        if parallel_sizes(saved) != parallel_sizes(now):
            rank_state = load_resharded(path, manifest, self.cfg, self.engine, self.model, self.lane_ids)
        else:
            load_path, _ = self.engine.load_checkpoint(
                path, tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {os.path.join(path, DEEPSPEED_TAG)}")
            rank_state = read_rank_state(path, dist.get_rank())
        # ZeRO restores the optimizer's state but not its groups' current LR; the scheduler knows it.
        scheduler = self.engine.lr_scheduler
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        if rank_state["lane_ids"] != self.lane_ids:
            raise ValueError(f"rank state holds lanes {rank_state['lane_ids']}, this rank runs {self.lane_ids}")
        for name, piece in self.states.items():
            piece.load_state_dict(rank_state[name])
        set_rng_state(rank_state["rng"])
