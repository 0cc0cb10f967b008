"""Per-step metrics: what is measured, the console line, the JSONL file, and the logger hook."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# Dense bf16 peak per device, TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class MetricsSink(Protocol):
    """Where rank 0's metrics go (console, JSONL, W&B...)."""

    def log(self, step: int, metrics: Dict[str, object]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object a line, ``{"step": ..., **metrics}``. A run starting at ``start_step`` (0, or the step of
    the checkpoint it resumes from) continues the file from there: rows of later steps, which the run will log
    again, are dropped first (and a line torn by a kill), the file rewritten atomically. ``dropped_rows``
    counts them."""

    def __init__(self, path: str, start_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.dropped_rows = _truncate_after(path, start_step)
        self._file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: Dict[str, object]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()


def training_steps(run_dir: str) -> List[dict]:
    """The training rows of ``<run_dir>/metrics.jsonl`` in step order, one per step (validation rows left
    out; where a resumed run logged a step again, its later row)."""
    rows: Dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def _truncate_after(path: str, step: int) -> int:
    """Keep the rows of steps <= step; how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _row_step(line: str) -> Optional[int]:
    """The step of a complete row; None for a line torn by a kill."""
    if not line.endswith("\n"):
        return None
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class ConsoleSink:
    def __init__(self, interval: int):
        self.interval = max(interval, 1)

    def log(self, step: int, metrics: Dict[str, object]) -> None:
        if "valid/loss" in metrics:
            print(
                f"step {step:>6} | valid loss {metrics['valid/loss']:.4f} | ppl {metrics['valid/ppl']:.2f}", flush=True
            )
        if "loss" not in metrics or (step % self.interval and step != 1):
            return
        parts = [
            f"step {step:>6}",
            f"loss {metrics['loss']:.4f}",
            f"lr {metrics['lr']:.2e}",
            f"grad {metrics['grad_norm']:.3f}",
            f"tok/s {metrics['tokens_per_s']:,.0f}",
        ]
        if metrics.get("mfu") is not None:
            parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
        if "gate_mean" in metrics:
            parts.append(f"gate {metrics['gate_mean']:.3f}")
        if metrics.get("skipped_steps"):
            parts.append(f"skipped {metrics['skipped_steps']}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        pass


def gate_values(model) -> Dict[int, List[float]]:
    """sigmoid(beta) per head for every layer (global layer index), gathered over TP and PP. ``model``: a
    stage's model or a rank's ``ModelChunks``.

    Each (TP rank, PP stage) of the model-parallel group reports once; TP ranks hold consecutive heads.
    Empty for a model without the memory (no gates).
    """
    local = {}
    for layer in model.layers:
        core = layer.self_attention.core_attention
        if not core.has_memory:
            continue
        gate = core.gate.detach().float()
        local[layer.layer_number - 1] = torch.sigmoid(gate).cpu().tolist()
    world = parallel_state.get_model_parallel_group()
    gathered = [None] * dist.get_world_size(group=world)
    dist.all_gather_object(gathered, (parallel_state.get_tensor_model_parallel_rank(), local), group=world)
    merged: Dict[int, List[float]] = {}
    for _, layers in sorted(gathered, key=lambda item: item[0]):
        for index, values in layers.items():
            merged.setdefault(index, []).extend(values)
    return dict(sorted(merged.items()))


def max_over_world(value: float) -> float:
    tensor = torch.tensor(
        [value], dtype=torch.float64, device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    )
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()
