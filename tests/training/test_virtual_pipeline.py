"""Interleaved 1F1B (parallel.virtual_pipeline): two model chunks per pipeline rank train as one process does.

References: one process running the same global batches (losses, with a tolerance: the chunks reduce
gradients and losses in another order); the uninterrupted run (a resume must be bitwise equal to it);
for a resume resharded to one chunk per rank, the interleaved run's global state at the save (exactly)
and its losses after it (with the tolerance).
"""

import os
import re

import pytest
import torch

from tests.distributed import run_distributed
from tests.recording import record
from tests.tolerance import assert_close
from tests.training import test_reshard as reshard_run
from tests.training.helpers import STEP_TOKENS, loss_values, train_overrides, training_depth
from tests.training.test_checkpoint import straight_and_resumed

STEPS = 5
# PP2 x 2 chunks of one layer each: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3; 4 microbatches of a lane.
INTERLEAVED = {
    "parallel.pipeline": 2,
    "parallel.virtual_pipeline": 2,
    "parallel.micro_batch_lanes": 1,
    "model.num_layers": 4,
    "data.global_lanes": 4,
}
# A forward-only pass through the chunks at the end.
VALIDATION = {"data.valid_fraction": 0.1, "validation.interval": STEPS, "validation.batches": 2}


def train_worker(rank, world, overrides):
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    try:
        trainer.fit()
        layers = [layer.layer_number - 1 for layer in trainer.model.layers]
    finally:
        trainer.close()
    return {
        "losses": [h["loss"] for h in history if "loss" in h],
        "valid": [h["valid/loss"] for h in history if "valid/loss" in h],
        "layers": layers,
    }


@pytest.fixture(scope="module")
def single_process(stdlib_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return run_distributed(
        train_worker,
        1,
        train_overrides(
            stdlib_shards,
            str(run_dir),
            **{
                **INTERLEAVED,
                **VALIDATION,
                "schedule.steps": STEPS,
                "parallel.pipeline": 1,
                "parallel.virtual_pipeline": 1,
            },
        ),
    )[0]


# world size, extra overrides, the global layers of each pipeline rank (data-parallel replicas repeat them).
LAYOUTS = {
    "pp2": (2, {}, [[0, 2], [1, 3]]),
    # Two microbatches per data-parallel rank; gradients of both chunks go through DeepSpeed's reduction.
    "pp2xdp2": (4, {"parallel.zero_stage": 1}, [[0, 2], [0, 2], [1, 3], [1, 3]]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interleaved_losses_match_single_process(layout, stdlib_shards, single_process, tmp_path):
    world, extra, layers = LAYOUTS[layout]
    interleaved = run_distributed(
        train_worker,
        world,
        train_overrides(
            stdlib_shards, str(tmp_path), **{**INTERLEAVED, **VALIDATION, "schedule.steps": STEPS, **extra}
        ),
    )
    assert [r["layers"] for r in interleaved] == layers
    assert len(single_process["losses"]) == STEPS
    # Losses fall: the optimizer really steps (a broken update would also match between layouts).
    assert single_process["losses"][-1] < single_process["losses"][0]
    assert len(single_process["valid"]) == 1
    for key in ("losses", "valid"):
        assert_close(
            interleaved[0][key], single_process[key], torch.float32, STEP_TOKENS, training_depth(STEPS), what=key
        )


@pytest.mark.slow
def test_resume_of_an_interleaved_run_is_bitwise_identical(stdlib_shards, tmp_path):
    straight, first, second = straight_and_resumed(stdlib_shards, tmp_path, 2, INTERLEAVED)
    assert [s for s, _ in second] == [4, 5, 6]
    assert first == straight
    assert second == straight[3:]  # bitwise: every chunk's memory, the data, RNG and optimizer continue


@pytest.fixture(scope="module")
def interleaved_checkpoint(stdlib_shards, tmp_path_factory):
    """PP2 x 2 chunks, test_reshard's model: tied embeddings (embedding in rank 0's first chunk, output layer in
    rank 1's last) and learned memory scales; its steps, with a checkpoint and the global state at SAVE_AT."""
    run_dir = str(tmp_path_factory.mktemp("vp2"))
    losses, gathered = run_distributed(
        reshard_run.train_and_gather,
        2,
        train_overrides(
            stdlib_shards, run_dir, **{**INTERLEAVED, "schedule.steps": reshard_run.STEPS, **reshard_run.MODEL}
        ),
    )[0]
    return os.path.join(run_dir, "checkpoints"), losses, gathered


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, layout",
    [
        (2, {"parallel.pipeline": 2}),
        (1, {"parallel.pipeline": 1}),
    ],
    ids=["to-pp2", "to-pp1"],
)
def test_reshard_from_two_chunks_to_one(stdlib_shards, tmp_path, interleaved_checkpoint, world, layout):
    checkpoints, straight, saved_state = interleaved_checkpoint
    save_at, steps = reshard_run.SAVE_AT, reshard_run.STEPS
    assert saved_state["memory"] and len({layer for layer, _, _ in saved_state["memory"]}) == 4
    losses, loaded_state = run_distributed(
        reshard_run.train_and_gather,
        world,
        train_overrides(
            stdlib_shards,
            str(tmp_path),
            **{
                **INTERLEAVED,
                **layout,
                "parallel.virtual_pipeline": 1,
                "schedule.steps": steps,
                **reshard_run.MODEL,
                "checkpoint.resume": os.path.join(checkpoints, f"step_{save_at:08d}"),
            },
        ),
    )[0]
    # Weights, fp32 masters, Adam moments and every (layer, lane, KV group)'s memory land where they belong.
    reshard_run.assert_same_state(loaded_state, saved_state)
    assert [s for s, _ in losses] == list(range(save_at + 1, steps + 1))
    assert_close(
        loss_values(losses),
        loss_values(straight[save_at:]),
        torch.float32,
        STEP_TOKENS,
        training_depth(steps - save_at),
    )


def merged_checkpoint_worker(rank, world, step_dir):
    from evals.common import read_checkpoint
    from training.distributed import init_single_process

    init_single_process()
    return read_checkpoint(step_dir)[1]


@pytest.mark.slow
def test_interleaved_checkpoint_merges_on_one_device(interleaved_checkpoint):
    checkpoints, _, saved_state = interleaved_checkpoint
    merged = run_distributed(merged_checkpoint_worker, 1, os.path.join(checkpoints, f"step_{reshard_run.SAVE_AT:08d}"))[
        0
    ]
    assert set(merged) == set(saved_state["weights"])
    for name, tensor in saved_state["weights"].items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"parallel.pipeline": 1, "parallel.virtual_pipeline": 2}, "parallel.pipeline > 1"),
        ({"parallel.pipeline": 2, "parallel.virtual_pipeline": 3}, "parallel.virtual_pipeline (2 x 3)"),
        ({"parallel.pipeline": 2, "parallel.virtual_pipeline": 0}, "parallel.virtual_pipeline must be >= 1"),
    ],
)
def test_invalid_virtual_pipeline_fails_at_load(overrides, key, tmp_path):
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [f"run_dir={tmp_path}", "model.num_layers=4", *(f"{k}={v}" for k, v in overrides.items())])


def start_worker(rank, world, overrides):
    from training.config import ConfigError, load_config
    from training.train import Trainer

    try:
        Trainer(load_config(None, overrides)).close()
    except ConfigError as error:
        return str(error)
    return None


@pytest.mark.slow
def test_microbatches_not_a_multiple_of_the_pipeline_fail_at_start(stdlib_shards, tmp_path):
    # 3 lanes of one microbatch each: the interleaved schedule runs groups of 2.
    overrides = train_overrides(stdlib_shards, str(tmp_path), **{**INTERLEAVED, "data.global_lanes": 3})
    messages = run_distributed(start_worker, 2, overrides)
    assert all(
        m is not None and "parallel.virtual_pipeline=2" in m and "parallel.micro_batch_lanes" in m and "= 3)" in m
        for m in messages
    ), messages
    assert not any(tmp_path.iterdir())  # nothing written
