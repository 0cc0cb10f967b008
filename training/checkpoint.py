"""Sharded checkpoints that resume exactly.

A checkpoint is a directory ``<dir>/step_<N>/`` holding
- ``ds/``: DeepSpeed's checkpoint: model shards per TP/PP rank, ZeRO optimizer shards per DP rank,
  the LR scheduler;
- ``rank_<R>.pt`` per global rank: what exact resume needs beyond the engine: the carried memory of
  the rank's lanes and layers, the data pipeline position, RNG states, progress counters, the
  W&B run id;
- ``config.yaml``: the resolved config; ``manifest.json`` (written last): layout and every file's size.

Saving is atomic: everything goes to ``.tmp-step_<N>/``, is flushed, and the directory is renamed;
the ``latest`` pointer is replaced afterwards. A process killed at any moment leaves the previous
checkpoint loadable, and ``resume: auto`` skips anything without a complete manifest.

Resuming on another layout (tensor, pipeline and/or data-parallel size) is ``training.reshard``'s:
weights, optimizer state, carried memory and data positions are mapped through global names
(ZeRO-1/2; ZeRO-3 fails with a message).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


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


def _save_torch(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def layout() -> dict:
    return {
        "world_size": dist.get_world_size(),
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }


def coordinates() -> dict:
    return {
        "rank": dist.get_rank(),
        "tensor": parallel_state.get_tensor_model_parallel_rank(),
        "pipeline": parallel_state.get_pipeline_model_parallel_rank(),
        "data": parallel_state.get_data_parallel_rank(),
    }


def _list_files(root: str) -> Dict[str, int]:
    files = {}
    for base, _, names in os.walk(root):
        for name in names:
            full = os.path.join(base, name)
            files[os.path.relpath(full, root)] = os.path.getsize(full)
    return files


def verify(path: str) -> dict:
    """The manifest of a complete checkpoint; a clear error naming what is missing or truncated."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete (interrupted save?)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest: {error}") from error
    for rel, size in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            raise CheckpointError(f"checkpoint shard missing: {full}")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint shard truncated or altered: {full} has {actual} bytes, expected {size}")
    return manifest


def list_checkpoints(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(STEP_PREFIX))
    return [os.path.join(root, n) for n in names]


def find_latest_valid(root: str) -> Optional[str]:
    """The newest checkpoint that verifies (the ``latest`` pointer first, then by step)."""
    candidates = []
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        candidates.append(os.path.join(root, open(pointer).read().strip()))
    candidates += list(reversed(list_checkpoints(root)))
    for path in candidates:
        try:
            verify(path)
            return path
        except CheckpointError:
            continue
    return None


class CheckpointManager:
    """Saves and restores a Trainer; every rank calls save/load (they are collective)."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg.checkpoint
        self.root = cfg.dir or os.path.join(trainer.cfg.run_dir, "checkpoints")
        self.keep_last = cfg.keep_last
        self.keep_every = cfg.keep_every

    def last_saved_step(self) -> Optional[int]:
        paths = list_checkpoints(self.root)
        return int(os.path.basename(paths[-1])[len(STEP_PREFIX):]) if paths else None

    # -- saving -------------------------------------------------------------------------------
    def save(self, reason: str = "interval"):
        """Returns (path, seconds, bytes written) - the byte count on rank 0 only."""
        trainer = self.trainer
        step = trainer.state.step
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, ".tmp-" + step_dir_name(step))
        rank = dist.get_rank()
        started = time.perf_counter()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            trainer.save_resolved_config(os.path.join(tmp, "config.yaml"))
        dist.barrier()
        trainer.engine.save_checkpoint(tmp, tag="ds", save_latest=False)
        _save_torch(trainer.rank_state(), os.path.join(tmp, f"rank_{rank:05d}.pt"))
        if step in trainer.cfg.checkpoint.inject_kill_during_save_at_steps and rank == 0:
            os.kill(os.getpid(), 9)
        dist.barrier()
        if rank == 0:
            for base, _, names in os.walk(tmp):
                for name in names:
                    _fsync_file(os.path.join(base, name))
            files = _list_files(tmp)
            manifest = {"format": FORMAT_VERSION, "step": step, "reason": reason, "layout": layout(),
                        "zero_stage": trainer.cfg.parallel.zero_stage, "global_lanes": trainer.cfg.data.global_lanes,
                        "files": files, "saved_at": time.time()}
            _write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(os.path.join(self.root, "latest"), step_dir_name(step).encode())
            self._prune()
        dist.barrier()
        elapsed = time.perf_counter() - started
        size = sum(_list_files(final).values()) if rank == 0 else 0
        return final, elapsed, size

    def _prune(self) -> None:
        paths = list_checkpoints(self.root)
        keep = set(paths[-self.keep_last:])
        for path in paths:
            step = int(os.path.basename(path)[len(STEP_PREFIX):])
            if path not in keep and not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(path, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------
    def resolve(self, resume: Optional[str]) -> Optional[str]:
        if resume is None:
            return None
        if resume == "auto":
            return find_latest_valid(self.root)
        verify(resume)
        return resume

    def load(self, path: str) -> None:
        trainer = self.trainer
        manifest = verify(path)
        saved, now = manifest["layout"], layout()
        if manifest["global_lanes"] != trainer.cfg.data.global_lanes:
            raise CheckpointError(f"{path} was saved with data.global_lanes={manifest['global_lanes']}; this run has "
                                  f"{trainer.cfg.data.global_lanes}: the lanes (and their memory) would not continue")
        if (saved["tensor"], saved["pipeline"], saved["data"]) != (now["tensor"], now["pipeline"], now["data"]):
            from training.reshard import load_resharded  # it builds on this module

            rank_state = load_resharded(trainer, path, manifest)
        else:
            load_path, _ = trainer.engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                          load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {os.path.join(path, 'ds')}")
            rank_state = torch.load(os.path.join(path, f"rank_{dist.get_rank():05d}.pt"), weights_only=False)
        # ZeRO restores the optimizer's state but not its groups' current LR; the scheduler knows it.
        scheduler = trainer.engine.lr_scheduler
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        trainer.load_rank_state(rank_state)
