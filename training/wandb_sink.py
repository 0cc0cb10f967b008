"""Weights & Biases logging: a MetricsSink that rank 0 uses to open, or continue, the run.

Every rank holds a ``WandbSink`` because the gate heatmap gathers the gates over the model-parallel
group (a collective); only rank 0 calls ``wandb.init`` and logs. The run id is kept in every
checkpoint, so a resumed or requeued job passes it back here and continues the same run.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
from omegaconf import OmegaConf

from training.config import TrainConfig

MODES = ("online", "offline", "disabled")

# viridis at 0, 0.25, 0.5, 0.75 and 1: readable without matplotlib, and in grey scale.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def resolve_mode(configured: Optional[str], environ=None) -> str:
    """The configured mode; else WANDB_MODE; else online with WANDB_API_KEY set, offline without."""
    env = os.environ if environ is None else environ
    if configured is not None:
        return configured
    if env.get("WANDB_MODE") in MODES:
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def heatmap_pixels(gates: Dict[int, List[float]], cell: int = 16) -> np.ndarray:
    """An RGB image of layers (rows) x heads (columns), sigmoid(gate) on a fixed 0..1 viridis scale."""
    values = np.clip(np.array([gates[layer] for layer in sorted(gates)], dtype=np.float64), 0.0, 1.0)
    position = values * (len(_VIRIDIS) - 1)
    low = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
    weight = (position - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - weight) + _VIRIDIS[low + 1] * weight
    return np.kron(rgb, np.ones((cell, cell, 1))).round().astype(np.uint8)


class WandbSink:
    def __init__(self, cfg: TrainConfig, rank: int, run_id: Optional[str], gates: Callable[[], Dict[int, List[float]]]):
        self.gates = gates
        self.heatmap_interval = cfg.logging.wandb.gate_heatmap_interval
        self.run = None
        self.run_id = run_id
        if rank != 0:
            return
        import wandb

        settings = cfg.logging.wandb
        self.wandb = wandb
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=settings.name or os.path.basename(os.path.abspath(cfg.run_dir)),
            tags=list(settings.tags) or None,
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            dir=cfg.run_dir,
            id=run_id,
            resume="allow",
            mode=resolve_mode(settings.mode),
        )
        self.run_id = self.run.id

    def log(self, step: int, metrics: Dict[str, object]) -> None:
        # Only training steps ("loss") are logged on every rank, so only they may run the collective.
        heatmap = None
        if "loss" in metrics and self.heatmap_interval and step % self.heatmap_interval == 0:
            heatmap = self.gates()
        if self.run is None:
            return
        data = {key: value for key, value in metrics.items() if value is not None}
        if heatmap:
            data["gate/heatmap"] = self.wandb.Image(
                heatmap_pixels(heatmap),
                caption=f"step {step}: sigmoid(gate), rows = layers 0-{len(heatmap) - 1}, "
                "columns = heads, 0 (purple) to 1 (yellow)",
            )
        self._guarded(self.run.log, data, step=step)

    def close(self) -> None:
        if self.run is not None:
            self._guarded(self.run.finish)

    def _guarded(self, call, *args, **kwargs) -> None:
        """W&B is monitoring: when it fails (its service process gone, a full disk), training goes on without it."""
        try:
            call(*args, **kwargs)
        except Exception as error:
            print(f"W&B logging stopped: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            self.run = None


def open_wandb(
    cfg: TrainConfig, rank: int, run_id: Optional[str], gates: Callable[[], Dict[int, List[float]]]
) -> Optional[WandbSink]:
    """A WandbSink on every rank, or None on every rank when W&B is disabled."""
    if resolve_mode(cfg.logging.wandb.mode) == "disabled":
        return None
    return WandbSink(cfg, rank, run_id, gates)
