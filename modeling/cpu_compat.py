"""Run megatron-core on a machine without a GPU.

megatron-core 0.16.1 hard-codes CUDA in places no config reaches: ``torch.cuda.current_device()``
as the device of communication buffers (tensor-parallel mappings, pipeline p2p), ``device="cuda"``
token counters in the pipeline schedules, ``torch.cuda.synchronize()`` after p2p, RoPE moving
its frequencies to the GPU, and the last stage's tied output weight moved there to sync at
construction. Inside ``megatron_on_cpu()`` those resolve to the CPU. On a machine with a GPU the
context does nothing. It is the only place the project bends megatron this way.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.RLock()
_depth = 0


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaDevicesToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def megatron_on_cpu():
    """Map megatron-core's hard-coded CUDA device uses to the CPU for the duration (no-op with a GPU)."""
    global _depth
    if torch.cuda.is_available():
        yield
        return
    with _lock:
        if _depth == 0:
            saved = (torch.cuda.current_device, torch.cuda.synchronize)
            torch.cuda.current_device = lambda: _CPU
            torch.cuda.synchronize = lambda device=None: None
        _depth += 1
    try:
        with _CudaDevicesToCpu():
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.cuda.current_device, torch.cuda.synchronize = saved
