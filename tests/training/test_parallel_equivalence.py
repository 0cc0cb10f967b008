"""Per-step losses of 3D-parallel runs equal one process running the same global batches."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.recording import record
from tests.training.conftest import train_overrides


def train_worker(rank, world, overrides):
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def single_process_losses(stdlib_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return run_distributed(train_worker, 1, train_overrides(stdlib_shards, str(run_dir)))[0]


LAYOUTS = {
    "tp2": (2, {"parallel.tensor": 2}),
    "pp2": (2, {"parallel.pipeline": 2}),
    "dp2-zero1": (2, {"parallel.zero_stage": 1}),
    "dp2-zero2": (2, {"parallel.zero_stage": 2}),
    "dp2-zero3": (2, {"parallel.zero_stage": 3}),
    "tp2xpp2": (4, {"parallel.tensor": 2, "parallel.pipeline": 2}),
    "pp2xdp2": (4, {"parallel.pipeline": 2, "parallel.zero_stage": 1}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_match_single_process(layout, stdlib_shards, single_process_losses, tmp_path):
    world, extra = LAYOUTS[layout]
    results = run_distributed(train_worker, world, train_overrides(stdlib_shards, str(tmp_path), **extra))
    assert len(single_process_losses) == 5
    # Losses fall: the optimizer really steps (a broken update would also match between layouts).
    assert single_process_losses[-1] < single_process_losses[0]
    torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(single_process_losses), rtol=1e-5, atol=1e-5)
