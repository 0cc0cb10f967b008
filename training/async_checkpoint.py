"""The training thread's half of an asynchronous checkpoint save: host snapshots of what is saved.

DeepSpeed's ``save_checkpoint`` sends every file it writes through ``engine.checkpoint_engine``.
During an asynchronous save that is a SnapshottingCheckpointEngine: its ``save`` copies the state
to host memory (pinned on GPUs) and keeps it, so training may change the live tensors as soon as
``save_checkpoint`` returns. CheckpointManager (training/checkpoint.py) hands the snapshots to a
background writer thread and finalizes the checkpoint once every rank's writer is done.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def snapshot_to_host(obj):
    """A copy of ``obj`` sharing nothing mutable with it, every tensor on the host.

    Tensors that share a storage share one copy of it, as ``torch.save`` would write it: a state
    dict of views into a flat buffer (ZeRO's parameters) costs the buffer once. On GPUs the copies
    go into pinned memory and the call returns once they have landed.
    """
    pinned = torch.cuda.is_available()
    storages: Dict[Tuple[str, int, int], torch.Tensor] = {}

    def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (str(storage.device), storage.data_ptr(), storage.nbytes())
        host = storages.get(key)
        if host is None:
            source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned and source.is_cuda)
            host.copy_(source, non_blocking=host.is_pinned())
            storages[key] = host
        copied = torch.empty(0, dtype=tensor.dtype).set_(
            host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(copied, requires_grad=tensor.requires_grad)
        return copied.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else copied

    def copy_of(value):
        if isinstance(value, torch.Tensor):
            return host_tensor(value)
        if isinstance(value, _IMMUTABLE):
            return value
        if isinstance(value, dict):
            copied = copy.copy(value)  # keeps the dict's type (OrderedDict, defaultdict's factory)
            for key, item in value.items():
                copied[key] = copy_of(item)
            return copied
        if type(value) is list:
            return [copy_of(item) for item in value]
        if type(value) is tuple:
            return tuple(copy_of(item) for item in value)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(copy_of(item) for item in value))
        # Anything else (DeepSpeed's loss scaler, numpy arrays of RNG states) is small.
        return copy.deepcopy(value)

    snapshot = copy_of(obj)
    if pinned:
        torch.cuda.current_stream().synchronize()
    return snapshot


class SnapshottingCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine, except that ``save`` only snapshots; ``take_files`` hands the
    snapshots over for writing (with the same serialization as the synchronous engine)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "SnapshottingCheckpointEngine"
        self._files: List[Tuple[str, object]] = []

    def create(self, info: CheckpointCommitInfo):
        self._files = []

    def save(self, state_dict, path: str):
        self._files.append((path, snapshot_to_host(state_dict)))

    def commit(self, info: CheckpointCommitInfo):
        # Nothing is on disk yet: CheckpointManager finalizes once every rank's writer is done.
        return True

    def take_files(self) -> List[Tuple[str, object]]:
        files, self._files = self._files, []
        return files
