"""Resume on another tensor/pipeline-parallel layout: weights, Adam state, carried memory, data and schedule continue.

The reference is the uninterrupted run on the saving layout: its losses after the resume point (the
layouts reduce in different orders, so with a tolerance), and its global training state at the save,
gathered through DeepSpeed's own per-parameter API, which must equal the resharded run's exactly.
"""

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.recording import record
from tests.tolerance import assert_close
from tests.training.helpers import STEP_TOKENS, fit_worker, loss_values, train_overrides, training_depth

SAVE_AT = 3
STEPS = 6
# The model of every run here; learned memory scales are TP-split over heads like the gates.
MODEL = {"model.tie_embeddings": True, "model.learned_memory_scales": True}
SAVING_LAYOUT = {"parallel.tensor": 2, "parallel.pipeline": 2, "parallel.zero_stage": 1, **MODEL}


def global_state(trainer) -> dict:
    """The run's state in layout-independent form (collective): full tensors by global name, memory by
    (layer, lane, KV group), optimizer step counts, schedule and counters."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from modeling.sharding import full_tensors
    from training.checkpoint_layout import coordinates

    model, engine = trainer.model, trainer.engine
    params = dict(model.named_parameters())
    # DeepSpeed links optimizer state to parameters once, right after the first group's first step,
    # when the other groups have none yet; link again so its per-parameter API sees every group.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {
        "weights": full_tensors(model, {n: p.detach().clone() for n, p in params.items()}),  # training goes on
        "fp32": full_tensors(model, {n: safe_get_full_fp32_param(p) for n, p in params.items()}),
        **{
            key: full_tensors(model, {n: safe_get_full_optimizer_state(p, key) for n, p in params.items()})
            for key in ("exp_avg", "exp_avg_sq")
        },
        "adam_steps": {float(s["step"]) for s in engine.optimizer.optimizer.state.values()},
        "lr": engine.lr_scheduler.get_last_lr(),
        "global_steps": engine.global_steps,
        "train_state": dict(vars(trainer.state)),
    }
    layers = [layer.layer_number - 1 for layer in model.layers]
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(
        pieces, (coordinates(), list(trainer.train_loader.lane_ids), layers, trainer.carried.state_dict())
    )
    memory = {}
    for coords, lanes, global_layers, carried in pieces:
        for global_layer, layer in zip(global_layers, carried["layers"]):
            groups = layer["M"].shape[1]
            for row, lane in enumerate(lanes):
                for group in range(groups):
                    key = (global_layer, lane, coords["tensor"] * groups + group)
                    memory[key] = (layer["M"][row, group], layer["z"][row, group])
    state["memory"] = memory
    return state


def train_and_gather(rank, world, overrides):
    """Train to schedule.steps; save and gather the global state at step SAVE_AT, or right after
    resuming there. Returns (per-step losses, global state)."""
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    gathered = global_state(trainer) if trainer.state.step == SAVE_AT else None
    batches = iter(trainer.train_loader)
    try:
        while trainer.state.step < trainer.cfg.schedule.steps:
            trainer.log(trainer.train_step(next(batches)))
            if trainer.state.step == SAVE_AT:
                trainer.save_checkpoint("interval")
                gathered = global_state(trainer)
    finally:
        trainer.close()
    return [(h["step"], h["loss"]) for h in history if "loss" in h], gathered


@pytest.fixture(scope="module")
def saving_run(stdlib_shards, tmp_path_factory):
    """TP2 x PP2, ZeRO-1, tied embeddings: STEPS steps uninterrupted, a checkpoint at SAVE_AT."""
    run_dir = str(tmp_path_factory.mktemp("tp2xpp2"))
    losses, gathered = run_distributed(
        train_and_gather, 4, train_overrides(stdlib_shards, run_dir, **{"schedule.steps": STEPS, **SAVING_LAYOUT})
    )[0]
    return os.path.join(run_dir, "checkpoints"), losses, gathered


def assert_same_state(loaded: dict, saved: dict) -> None:
    for key in ("weights", "fp32", "exp_avg", "exp_avg_sq"):
        assert loaded[key].keys() == saved[key].keys(), key
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), f"{key} of {name} differs after resharding"
    assert loaded["memory"].keys() == saved["memory"].keys()
    for where, (M, z) in saved["memory"].items():
        assert torch.equal(loaded["memory"][where][0], M) and torch.equal(loaded["memory"][where][1], z), where
    for key in ("adam_steps", "lr", "global_steps", "train_state"):
        assert loaded[key] == saved[key], key


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, layout, resume",
    [
        (1, {}, "auto"),
        (4, {"parallel.tensor": 2, "parallel.zero_stage": 2}, "path"),
    ],
    ids=["to-tp1", "to-tp2xdp2-zero2"],
)
def test_resume_on_another_layout_continues_the_run(stdlib_shards, tmp_path, saving_run, world, layout, resume):
    checkpoints, straight, saved_state = saving_run
    assert saved_state["adam_steps"] == {float(SAVE_AT)} and saved_state["memory"]
    scales = [name for name in saved_state["weights"] if "log_scale" in name]
    assert len(scales) == 8 and all((saved_state["weights"][name] != 0).all() for name in scales)
    where = (
        {"checkpoint.dir": checkpoints, "checkpoint.resume": "auto"}
        if resume == "auto"
        else {"checkpoint.resume": os.path.join(checkpoints, f"step_{SAVE_AT:08d}")}
    )
    losses, loaded_state = run_distributed(
        train_and_gather,
        world,
        train_overrides(stdlib_shards, str(tmp_path), **{"schedule.steps": STEPS, **MODEL, **layout, **where}),
    )[0]
    assert_same_state(loaded_state, saved_state)
    assert [s for s, _ in losses] == list(range(SAVE_AT + 1, STEPS + 1))
    assert_close(
        loss_values(losses),
        loss_values(straight[SAVE_AT:]),
        torch.float32,
        STEP_TOKENS,
        training_depth(STEPS - SAVE_AT),
    )


def load_error(rank, world, overrides):
    from training.checkpoint_layout import CheckpointError
    from training.config import load_config
    from training.train import Trainer

    try:
        Trainer(load_config(None, overrides)).close()
    except CheckpointError as error:
        return str(error)
    return None


@pytest.mark.slow
def test_zero3_layout_change_fails_naming_both_layouts(stdlib_shards, tmp_path, saving_run):
    zero3 = str(tmp_path / "zero3")
    run_distributed(
        fit_worker,
        2,
        train_overrides(
            stdlib_shards,
            zero3,
            **{
                "schedule.steps": 1,
                "schedule.warmup_steps": 0,
                "parallel.zero_stage": 3,
                "checkpoint.save_at_end": True,
            },
        ),
    )
    message = run_distributed(
        load_error,
        2,
        train_overrides(
            stdlib_shards, zero3, **{"parallel.zero_stage": 3, "parallel.tensor": 2, "checkpoint.resume": "auto"}
        ),
    )[0]
    assert message is not None
    assert "tensor=1 pipeline=1 data=2 ZeRO-3" in message and "tensor=2 pipeline=1 data=1 ZeRO-3" in message
    # Into ZeRO-3 from a ZeRO-1 checkpoint of another layout: refused too.
    checkpoints = saving_run[0]
    message = run_distributed(
        load_error,
        1,
        train_overrides(
            stdlib_shards,
            str(tmp_path / "into_zero3"),
            **{"parallel.zero_stage": 3, **MODEL, "checkpoint.dir": checkpoints, "checkpoint.resume": "auto"},
        ),
    )[0]
    assert message is not None
    assert "tensor=2 pipeline=2 data=1 ZeRO-1" in message and "tensor=1 pipeline=1 data=1 ZeRO-3" in message
