"""How a checkpoint's files are written and checked: torch.save through a running CRC-32, flushed to disk.

The checksum is taken over the bytes as torch.save hands them to the file, so it costs no second pass
over the data and, in an asynchronous save, no time on the training thread (the writer thread hashes).
Verification (training/checkpoint_layout.py) re-reads each file and compares.
"""

from __future__ import annotations

import os
import zlib
from typing import Dict

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

_READ_CHUNK_BYTES = 1 << 24


class _Crc32Writer:
    """A binary file that keeps the CRC-32 of everything written to it."""

    def __init__(self, file):
        self._file = file
        self.crc32 = 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def save_with_crc32(obj, path: str, zipfile_serialization: bool = True) -> int:
    """torch.save ``obj`` to ``path`` and flush it to disk; the CRC-32 of the file's bytes."""
    with open(path, "wb") as file:
        writer = _Crc32Writer(file)
        torch.save(obj, writer, _use_new_zipfile_serialization=zipfile_serialization)
        file.flush()
        os.fsync(file.fileno())
    return writer.crc32


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


class ChecksummingCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine, writing through ``save_with_crc32``; ``take_checksums`` hands over the
    CRC-32 of every file written since."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "ChecksummingCheckpointEngine"
        self._checksums: Dict[str, int] = {}

    def create(self, info: CheckpointCommitInfo):
        self._checksums = {}

    def save(self, state_dict, path: str):
        self._checksums[path] = save_with_crc32(state_dict, path, self.zipfile_serialization)

    def take_checksums(self) -> Dict[str, int]:
        checksums, self._checksums = self._checksums, {}
        return checksums
