"""The checkpoint directory layout, and the one reader of it.

A checkpoint is a directory ``<root>/step_<N>/`` holding
- ``ds/``: DeepSpeed's checkpoint: per model-parallel rank ``mp_rank_XX_model_states.pt`` (the module
  and the LR scheduler), per (DeepSpeed data-parallel rank, model-parallel rank) a ZeRO optimizer file,
  DeepSpeed's data-parallel ranks being the data- x context-parallel ranks;
- ``rank_<R>.pt`` per global rank: what exact resume needs beyond the engine (its ``coordinates`` in
  the layout, lane ids, carried memory, data position, RNG states, progress counters, W&B run id);
- ``config.yaml``: the resolved config; ``manifest.json`` (written last): the layout, the ZeRO stage,
  the global lanes and every file's size and CRC-32.

A ``latest`` file in the root names the newest finalized step directory. Saving is
training/checkpoint.py's; everything that reads a checkpoint (resume, resharding, evaluation) finds
its files here.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from modeling.sharding import global_name, rank_layers, split_chunk_name
from training.checkpoint_io import file_crc32

STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
LATEST = "latest"
CONFIG = "config.yaml"
DEEPSPEED_TAG = "ds"
"""The sub-directory DeepSpeed's ``save_checkpoint``/``load_checkpoint`` write and read (their ``tag``)."""
FORMAT_VERSION = 3
"""3: the manifest records each file as ``{"bytes": size, "crc32": checksum}``; 2: sizes only (verified by size).
Both name parameters by model chunk (``<chunk>.<name in the chunk>``, ``modeling.model.ModelChunks``)."""
READABLE_FORMATS = (2, 3)
UNFINISHED_PREFIX = ".tmp-"
"""A save in progress writes ``.tmp-step_<N>/`` and renames it when complete."""


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: str) -> int:
    return int(os.path.basename(path)[len(STEP_PREFIX) :])


def rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank_{rank:05d}.pt")


def layout() -> dict:
    """This process's parallel layout, as a manifest records it."""
    return {
        "world_size": dist.get_world_size(),
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "data": parallel_state.get_data_parallel_world_size(),
        "context": parallel_state.get_context_parallel_world_size(),
    }


def check_format(path: str, manifest: dict) -> None:
    """A checkpoint of a format this code does not read cannot be resumed: its names would not match."""
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format')}; this version reads formats "
            f"{' and '.join(map(str, READABLE_FORMATS))} only (parameters named by model chunk); export its weights "
            "with the version that wrote it (python -m training.export) and start from them with checkpoint.init_from"
        )


def coordinates() -> dict:
    """This rank's place in the layout, as its rank file records it."""
    return {
        "rank": dist.get_rank(),
        "tensor": parallel_state.get_tensor_model_parallel_rank(),
        "pipeline": parallel_state.get_pipeline_model_parallel_rank(),
        "data": parallel_state.get_data_parallel_rank(),
        "context": parallel_state.get_context_parallel_rank(),
    }


def parallel_sizes(layout_: dict) -> tuple:
    """(tensor, pipeline, data, context, virtual pipeline) sizes of a layout; checkpoints from before context
    parallelism had 1."""
    return (
        layout_["tensor"],
        layout_["pipeline"],
        layout_["data"],
        layout_.get("context", 1),
        layout_["virtual_pipeline"],
    )


def context_rank(state: dict) -> int:
    """A rank state's context-parallel rank (0 in checkpoints from before context parallelism)."""
    return state["coordinates"].get("context", 0)


def list_files(root: str) -> Dict[str, int]:
    """Every file under root (relative path -> size)."""
    files = {}
    for base, _, names in os.walk(root):
        for name in names:
            full = os.path.join(base, name)
            files[os.path.relpath(full, root)] = os.path.getsize(full)
    return files


def manifest_files(sizes: Dict[str, int], checksums: Dict[str, int]) -> Dict[str, dict]:
    """A manifest's ``files``: every file's size and CRC-32 (both keyed by the path relative to the checkpoint)."""
    return {rel: {"bytes": size, "crc32": checksums[rel]} for rel, size in sorted(sizes.items())}


def read_manifest(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a checkpoint directory"
        )
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        if any(name.startswith(STEP_PREFIX) for name in os.listdir(path)):
            raise CheckpointError(f"{path} holds checkpoints; name one of its {STEP_PREFIX}<N> directories")
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete (interrupted save?)")
    try:
        with open(manifest_path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest: {error}") from error


def verify(path: str, checksum_share: Optional[Tuple[int, int]] = (0, 1)) -> dict:
    """The manifest of a complete, intact checkpoint; a clear error naming the file missing, truncated or corrupt.

    Every file's size is checked; the CRC-32 of the files whose index (in the manifest's sorted order) is
    ``index`` modulo ``count`` for ``checksum_share=(index, count)`` (ranks share the reading), of none for None."""
    manifest = read_manifest(path)
    for position, (rel, entry) in enumerate(sorted(manifest["files"].items())):
        size, checksum = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry["crc32"])
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            raise CheckpointError(f"checkpoint file missing: {full}")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint file truncated or altered: {full} has {actual} bytes, expected {size}")
        if checksum is None or checksum_share is None or position % checksum_share[1] != checksum_share[0]:
            continue
        actual_checksum = file_crc32(full)
        if actual_checksum != checksum:
            raise CheckpointError(
                f"checkpoint file corrupt: {full} has CRC-32 {actual_checksum:08x}, the manifest records {checksum:08x}"
            )
    return manifest


def list_checkpoints(root: str) -> List[str]:
    """The finalized checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(STEP_PREFIX))
    return [os.path.join(root, n) for n in names]


def list_unfinished(root: str) -> List[str]:
    """Saves under root that never completed (killed or failed before their rename)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(UNFINISHED_PREFIX + STEP_PREFIX))
    return [os.path.join(root, n) for n in names]


def resume_candidates(root: str) -> List[str]:
    """The checkpoints a run may resume from, in order of preference: the one ``latest`` names, then by step,
    newest first."""
    candidates = []
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            candidates.append(os.path.join(root, f.read().strip()))
    candidates += reversed(list_checkpoints(root))
    return list(dict.fromkeys(candidates))


def find_latest_valid(root: str, checksums: bool = True) -> Optional[str]:
    """The newest checkpoint that verifies (with every file's checksum, or by size only)."""
    for path in resume_candidates(root):
        try:
            verify(path, (0, 1) if checksums else None)
            return path
        except CheckpointError:
            continue
    return None


def find_step_dir(path: str) -> Optional[str]:
    """A verified step directory from a step directory or a checkpoint root (its latest valid step); None when
    ``path`` is neither."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        verify(path)
        return path
    if os.path.isdir(path) and any(n.startswith(STEP_PREFIX) for n in os.listdir(path)):
        latest = find_latest_valid(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: no complete, intact checkpoint (every {STEP_PREFIX}* fails to verify)")
        return latest
    return None


def read_rank_state(path: str, rank: int) -> dict:
    """The rank file of ``rank``, as saved (for a resume on the same layout)."""
    return torch.load(rank_file(path, rank), weights_only=False)


class SavedCheckpoint:
    """A verified checkpoint's files, addressed by the (tensor, pipeline, data, context) coordinates of the run
    that saved it. Tensors load on the CPU, memory-mapped."""

    def __init__(self, path: str, manifest: Optional[dict] = None):
        self.path = path
        self.manifest = verify(path) if manifest is None else manifest
        check_format(path, self.manifest)
        self.layout = self.manifest["layout"]
        self.rank_states = [
            torch.load(rank_file(path, rank), map_location="cpu", mmap=True, weights_only=False)
            for rank in range(self.layout["world_size"])
        ]
        # DeepSpeed numbers model files by rank in the model-parallel group: the group's global ranks, sorted.
        group = sorted(
            (s["coordinates"] for s in self.rank_states if s["coordinates"]["data"] == 0 and context_rank(s) == 0),
            key=lambda c: c["rank"],
        )
        if len(group) != self.layout["tensor"] * self.layout["pipeline"]:
            raise CheckpointError(
                f"{path}: found {len(group)} data- and context-parallel rank 0 states, expected "
                f"{self.layout['tensor'] * self.layout['pipeline']}"
            )
        self.model_parallel_rank = {(c["tensor"], c["pipeline"]): index for index, c in enumerate(group)}

    def rank_layers(self, pipeline: int, num_layers: int) -> List[int]:
        """The global layers saved pipeline rank ``pipeline`` held, in its local order (chunk by chunk)."""
        return rank_layers(num_layers, self.layout["pipeline"], self.layout["virtual_pipeline"], pipeline)

    def global_name(self, name: str, pipeline: int, num_layers: int, tie_embeddings: bool) -> str:
        """The full-model name of a parameter of saved pipeline rank ``pipeline``, named as DeepSpeed saved it
        (``<chunk>.<name in the chunk>``)."""
        layers = self.rank_layers(pipeline, num_layers)
        chunk, local = split_chunk_name(name)
        return global_name(local, layers[chunk * len(layers) // self.layout["virtual_pipeline"]], tie_embeddings)

    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG)

    def model_states(self, tensor: int = 0, pipeline: int = 0) -> dict:
        """DeepSpeed's model-states file of one (tensor, pipeline) rank: ``module``, ``param_shapes``, the
        LR scheduler and the engine's counters."""
        mp_rank = self.model_parallel_rank[(tensor, pipeline)]
        return torch.load(
            os.path.join(self.path, DEEPSPEED_TAG, f"mp_rank_{mp_rank:02d}_model_states.pt"),
            map_location="cpu",
            mmap=True,
            weights_only=False,
        )

    def zero_file(self, tensor: int, pipeline: int, data: int) -> str:
        """The ZeRO optimizer file of one (tensor, pipeline, data) rank."""
        mp_rank = self.model_parallel_rank[(tensor, pipeline)]
        names = [f"{prefix}zero_pp_rank_{data}_mp_rank_{mp_rank:02d}_optim_states.pt" for prefix in ("", "bf16_")]
        for name in names:
            if os.path.exists(os.path.join(self.path, DEEPSPEED_TAG, name)):
                return os.path.join(self.path, DEEPSPEED_TAG, name)
        raise CheckpointError(f"{self.path}: no ZeRO optimizer file {names[0]} (or {names[1]})")

    def zero_states(self, tensor: int, pipeline: int, data: int) -> dict:
        return torch.load(self.zero_file(tensor, pipeline, data), map_location="cpu", mmap=True, weights_only=False)
