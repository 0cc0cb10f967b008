"""The tiny training run the training and launch tests share, and the worker that fits it."""

import os
from typing import List, Optional, Tuple

import torch

from tests import recording
from tests.distributed import free_port
from tests.tolerance import assert_close

# The tiny run's shape, for tolerances (tests/tolerance.py): the largest sum inside the model runs over the
# MLP's hidden size, the largest of a step over its tokens (the loss, the weight gradients).
LAYERS = 4
FFN_HIDDEN = 64
STEP_TOKENS = 4 * 2 * 16


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def single_process_env() -> dict:
    """The environment of a training CLI run as one plain process from the checkout, on the CPU."""
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        PYTHONPATH=REPO,
        WORLD_SIZE="1",
        RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def train_overrides(shards: str, run_dir: str, **extra) -> list:
    """A tiny fp32 run: 4 global lanes, 2 segments of 16 tokens a window."""
    base = {
        "run_dir": run_dir,
        "precision": "fp32",
        "model.num_layers": LAYERS,
        "model.hidden_size": 32,
        "model.num_attention_heads": 4,
        "model.num_query_groups": 2,
        "model.ffn_hidden_size": FFN_HIDDEN,
        "model.segment_length": 16,
        "data.n_segments": 2,
        "data.global_lanes": 4,
        "data.num_workers": 0,
        "data.shuffle_buffer": 8,
        "data.sources": f"[{{path: {shards}}}]",
        "schedule.steps": 5,
        "schedule.warmup_steps": 2,
        "optimizer.lr": 1e-2,
        "logging.interval": 1,
        "logging.wandb.mode": "disabled",
        "checkpoint.save_at_end": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def fit_worker(rank: int, world: int, overrides: list, config: Optional[str] = None) -> List[dict]:
    """run_distributed worker: build the Trainer from config (None: the defaults) and overrides, fit, close;
    returns its history."""
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(config, overrides))
    history = recording.record(trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return history


def losses_worker(rank: int, world: int, overrides: list, config: Optional[str] = None) -> List[Tuple[int, float]]:
    """fit_worker's (step, loss) pairs."""
    return [(h["step"], h["loss"]) for h in fit_worker(rank, world, overrides, config) if "loss" in h]


def steps_worker(
    rank: int, world: int, overrides: list, config: Optional[str] = None
) -> List[Tuple[int, float, float]]:
    """fit_worker's (step, loss, gradient norm) rows."""
    return [(h["step"], h["loss"], h["grad_norm"]) for h in fit_worker(rank, world, overrides, config) if "loss" in h]


def assert_same_steps(run: list, reference: list, step_tokens: int = STEP_TOKENS) -> None:
    """steps_worker rows of two layouts, which add the same float32 terms in other orders: sums over a step's
    tokens, through every layer forward and backward, compounded up to the reference's last step."""
    assert [row[0] for row in run] == [row[0] for row in reference]
    for column, what in ((1, "losses"), (2, "gradient norms")):
        assert_close(
            [row[column] for row in run],
            [row[column] for row in reference],
            torch.float32,
            step_tokens,
            training_depth(reference[-1][0]),
            what=what,
        )


def training_depth(steps: int) -> int:
    """Sums an error passes through in sequence over steps of the tiny run: each layer, forward and backward."""
    return steps * 2 * LAYERS


def loss_values(losses: List[Tuple[int, float]]) -> torch.Tensor:
    return torch.tensor([loss for _, loss in losses])
