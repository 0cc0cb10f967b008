"""Interleaved 1F1B (parallel.virtual_pipeline): two model chunks per pipeline rank train as one process does.

References: one process running the same global batches (losses, with a tolerance: the chunks reduce
gradients and losses in another order), the uninterrupted run (a resume must be bitwise equal to it)
and the uninterrupted interleaved run again for a resume resharded to one chunk per rank.
"""

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.conftest import train_overrides

STEPS = 5
# PP2 x 2 chunks of one layer each: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3; 4 microbatches of a lane.
INTERLEAVED = {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2, "parallel.micro_batch_lanes": 1,
               "model.num_layers": 4, "data.global_lanes": 4, "schedule.steps": STEPS}
TOKENS_PER_STEP = 4 * 2 * 16  # lanes x n_segments x segment_length of train_overrides
# float32 rounding of a sum over a step's tokens, taken in another order: eps x reduction size.
LOSS_TOLERANCE = torch.finfo(torch.float32).eps * TOKENS_PER_STEP


def train_worker(rank, world, overrides):
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    try:
        trainer.fit()
        layers = [layer.layer_number - 1 for layer in trainer.model.layers]
    finally:
        trainer.close()
    return {"losses": [h["loss"] for h in trainer.state.history if "loss" in h], "layers": layers}


@pytest.mark.slow
def test_interleaved_losses_match_single_process(stdlib_shards, tmp_path):
    single = run_distributed(train_worker, 1, train_overrides(
        stdlib_shards, str(tmp_path / "single"), **{**INTERLEAVED, "parallel.pipeline": 1,
                                                    "parallel.virtual_pipeline": 1}))[0]
    interleaved = run_distributed(train_worker, 2, train_overrides(stdlib_shards, str(tmp_path / "vp2"),
                                                                   **INTERLEAVED))
    assert [r["layers"] for r in interleaved] == [[0, 2], [1, 3]]
    assert len(single["losses"]) == STEPS
    # Losses fall: the optimizer really steps (a broken update would also match between layouts).
    assert single["losses"][-1] < single["losses"][0]
    torch.testing.assert_close(torch.tensor(interleaved[0]["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)
