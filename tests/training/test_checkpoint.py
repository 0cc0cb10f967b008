"""Checkpoints: exact resume (bitwise, fp32), kill -9 during a save, elastic DP resume, corrupt shards, export;
asynchronous saves (training continues while a background writer writes; its failure is an error).

Resuming on another TP/PP layout: test_reshard.py.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from modeling.export import read_export
from tests.distributed import run_distributed
from tests.tolerance import assert_close, tolerance
from tests.training.helpers import (
    FFN_HIDDEN,
    LAYERS,
    STEP_TOKENS,
    fit_worker,
    loss_values,
    losses_worker,
    train_overrides,
    training_depth,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def straight_and_resumed(shards, tmp_path, world, extra, steps=6, resume_world=None, straight=True):
    """Per-step losses of an uninterrupted run (None unless straight), of a run that saves at steps/2 and goes
    on, and of its resumption from that checkpoint on resume_world processes."""
    straight = (
        run_distributed(
            losses_worker,
            world,
            train_overrides(shards, str(tmp_path / "straight"), **{"schedule.steps": steps, **extra}),
        )[0]
        if straight
        else None
    )
    run_dir = str(tmp_path / "resumed")
    first = run_distributed(
        losses_worker,
        world,
        train_overrides(shards, run_dir, **{"schedule.steps": steps, "checkpoint.interval": steps // 2, **extra})
        + [f"schedule.steps={steps}"],
    )
    # Stop halfway: the checkpoint at steps/2 is the resume point; drop the later one.
    ckpts = os.path.join(run_dir, "checkpoints")
    shutil.rmtree(os.path.join(ckpts, f"step_{steps:08d}"), ignore_errors=True)
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write(f"step_{steps // 2:08d}")
    second = run_distributed(
        losses_worker,
        resume_world or world,
        train_overrides(shards, run_dir, **{"schedule.steps": steps, "checkpoint.resume": "auto", **extra}),
    )[0]
    return straight, first[0], second


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, extra",
    [
        (4, {"parallel.tensor": 2, "parallel.pipeline": 2, "parallel.zero_stage": 1}),
        (2, {"parallel.zero_stage": 2}),
        # The delayed writer writes after later steps changed the live state: only a true snapshot resumes exactly.
        (2, {"parallel.zero_stage": 1, "checkpoint.async_save": True, "debug.inject_writer_delay_s": 1.0}),
        # The learned memory scales and their Adam state are saved and restored like any weight.
        (1, {"model.learned_memory_scales": True}),
        # Without the memory a stage carries nothing from window to window, and its checkpoint holds none.
        (2, {"parallel.pipeline": 2, "model.memory": False}),
    ],
    ids=["tp2xpp2-zero1", "dp2-zero2", "dp2-zero1-async", "single-learned-memory-scales", "pp2-memory-off"],
)
def test_resume_is_bitwise_identical(stdlib_shards, tmp_path, world, extra):
    straight, first, second = straight_and_resumed(stdlib_shards, tmp_path, world, extra)
    assert [s for s, _ in second] == [4, 5, 6]
    # Bitwise: one layout, one thread a process, so every sum runs in the same order on both sides.
    assert first == straight  # the run that saved is itself undisturbed by saving
    assert second == straight[3:]  # memory, data, RNG, optimizer all continue


@pytest.mark.slow
@pytest.mark.parametrize("world, resume_world", [(2, 1), (1, 2)], ids=["dp2-to-dp1", "dp1-to-dp2"])
def test_elastic_resume_on_another_dp_size(stdlib_shards, tmp_path, world, resume_world):
    # The run that saved went on uninterrupted (test_resume_is_bitwise_identical: saving leaves it undisturbed).
    _, saving, second = straight_and_resumed(
        stdlib_shards, tmp_path, world, {"parallel.zero_stage": 1}, resume_world=resume_world, straight=False
    )
    assert [s for s, _ in second] == [4, 5, 6]
    # Another DP size sums the gradients over the step's tokens in another order.
    assert_close(loss_values(second), loss_values(saving[3:]), torch.float32, STEP_TOKENS, training_depth(6))


@pytest.fixture(scope="module")
def uninterrupted_two_rank_run(stdlib_shards, tmp_path_factory):
    """Per-step losses of 6 steps on 2 ranks without a checkpoint."""
    run_dir = str(tmp_path_factory.mktemp("straight"))
    return run_distributed(losses_worker, 2, train_overrides(stdlib_shards, run_dir, **{"schedule.steps": 6}))[0]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_during_save_then_auto_resume(stdlib_shards, uninterrupted_two_rank_run, tmp_path, async_save):
    run_dir = str(tmp_path / "run")
    # Asynchronous: rank 0's background writer kills the process after its first file, the delay keeping the
    # write pending over the next step boundaries (where nothing may finalize it).
    base = {
        "schedule.steps": 6,
        "checkpoint.interval": 2,
        "checkpoint.async_save": async_save,
        "debug.inject_writer_delay_s": 0.5 if async_save else 0.0,
    }
    with pytest.raises(RuntimeError, match="exit code -9|rank 0"):
        run_distributed(
            losses_worker,
            2,
            train_overrides(stdlib_shards, run_dir, **base, **{"debug.inject_kill_during_save_at_steps": "[4]"}),
            timeout=180,
        )
    ckpts = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == [".tmp-step_00000004", "latest", "step_00000002"]
    resumed = run_distributed(
        losses_worker, 2, train_overrides(stdlib_shards, run_dir, **base, **{"checkpoint.resume": "auto"})
    )[0]
    assert resumed == uninterrupted_two_rank_run[2:]


@pytest.mark.slow
def test_training_continues_while_the_writer_writes(stdlib_shards, tmp_path):
    from training.checkpoint_layout import verify

    run_dir = str(tmp_path / "run")
    delay = 1.0
    history = run_distributed(
        fit_worker,
        1,
        train_overrides(
            stdlib_shards,
            run_dir,
            **{
                "schedule.steps": 5,
                "checkpoint.interval": 2,
                "checkpoint.async_save": True,
                "debug.inject_writer_delay_s": delay,
            },
        ),
    )[0]
    reports = {row["checkpoint/step"]: row for row in history if "checkpoint/step" in row}
    assert sorted(reports) == [2, 4]
    first = reports[2]
    # Logged at the step boundary where it was finalized: steps 3 and 4 ran while the writer slept and wrote.
    assert first["step"] == 4
    assert [row["step"] for row in history[: history.index(first)] if "loss" in row] == [1, 2, 3, 4]
    assert first["checkpoint/async"] == 1 and first["checkpoint/blocking_seconds"] < delay / 2
    assert first["checkpoint/seconds"] >= first["checkpoint/write_seconds"] >= delay
    assert first["checkpoint/gb"] > 0 and first["checkpoint/gb_per_s"] > 0
    # The save at step 4 waited for the end of training; both checkpoints are complete.
    assert reports[4]["step"] == 5
    for step in (2, 4):
        path = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
        verify(path)
        assert torch.load(os.path.join(path, "rank_00000.pt"), weights_only=False)["train_state"]["step"] == step


def failing_save_worker(rank, world, overrides):
    from training.checkpoint_layout import CheckpointError
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    try:
        trainer.fit()
    except CheckpointError as error:
        return str(error)
    finally:
        trainer.close()
    return None


@pytest.mark.slow
def test_writer_failure_is_an_error_and_never_finalized(stdlib_shards, tmp_path):
    from training.checkpoint_layout import find_latest_valid

    run_dir = str(tmp_path / "run")
    messages = run_distributed(
        failing_save_worker,
        2,
        train_overrides(
            stdlib_shards,
            run_dir,
            **{
                "schedule.steps": 6,
                "checkpoint.interval": 2,
                "checkpoint.async_save": True,
                "debug.inject_writer_failure_at_steps": "[4]",
            },
        ),
    )
    ckpts = os.path.join(run_dir, "checkpoints")
    failed_file = os.path.join(ckpts, ".tmp-step_00000004", "ds", "mp_rank_00_model_states.pt")
    assert messages[0] is not None and f"checkpoint writer failed writing {failed_file}" in messages[0]
    assert "injected writer failure" in messages[0] and "step 4 was not finalized" in messages[0]
    assert messages[1] is not None and "another rank's checkpoint writer failed" in messages[1]
    assert sorted(os.listdir(ckpts)) == [".tmp-step_00000004", "latest", "step_00000002"]
    assert find_latest_valid(ckpts) == os.path.join(ckpts, "step_00000002")


def load_worker(rank, world, overrides):
    from training.checkpoint_layout import CheckpointError
    from training.config import load_config
    from training.train import Trainer

    try:
        Trainer(load_config(None, overrides))
    except CheckpointError as error:
        return str(error)
    return None


@pytest.mark.slow
def test_missing_or_truncated_shard_is_named(stdlib_shards, tmp_path):
    run_dir = str(tmp_path / "run")
    run_distributed(
        losses_worker,
        1,
        train_overrides(stdlib_shards, run_dir, **{"schedule.steps": 2, "checkpoint.save_at_end": True}),
    )
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
    rank_file = os.path.join(ckpt, "rank_00000.pt")
    with open(rank_file, "r+b") as f:
        f.truncate(100)
    explicit = train_overrides(stdlib_shards, run_dir, **{"checkpoint.resume": ckpt})
    message = run_distributed(load_worker, 1, explicit)[0]
    assert message is not None and "truncated" in message and "rank_00000.pt" in message
    os.remove(rank_file)
    message = run_distributed(load_worker, 1, explicit)[0]
    assert message is not None and "missing" in message and "rank_00000.pt" in message


def export_worker(rank, world, overrides, out_dir):
    from megatron.core import parallel_state

    from modeling.cpu_compat import megatron_on_cpu
    from modeling.export import export_model
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    trainer.fit()
    export_model(trainer.model, trainer.cfg.model, out_dir)
    ids = torch.arange(64).reshape(2, 32) % 250
    with torch.no_grad(), megatron_on_cpu():
        trainer.model.eval()
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            logits, _ = trainer.model[0](ids, None, None, None)
            gathered = [torch.empty_like(logits) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
            torch.distributed.all_gather(
                gathered, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
            )
            logits = torch.cat(gathered, dim=-1)
        else:
            logits = None
    trainer.close()
    return logits


def reload_worker(rank, world, out_dir):
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.export import load_exported
    from training.distributed import init_single_process

    init_single_process()
    model, cfg = load_exported(out_dir)
    ids = torch.arange(64).reshape(2, 32) % 250
    with torch.no_grad(), megatron_on_cpu():
        logits, _ = model(ids, None, None, None)
    return logits


@pytest.mark.slow
def test_export_from_tp2_reloads_with_the_same_logits(stdlib_shards, tmp_path):
    """With learned memory scales: gathered over the TP ranks' heads, exported, loaded on one device."""
    out_dir = str(tmp_path / "export")
    logits = run_distributed(
        export_worker,
        2,
        train_overrides(
            stdlib_shards,
            str(tmp_path / "run"),
            **{"schedule.steps": 2, "parallel.tensor": 2, "model.learned_memory_scales": True},
        ),
        out_dir,
    )[0]
    reloaded = run_distributed(reload_worker, 1, out_dir)[0]
    # TP=2 splits the sums over the hidden size; TP=1 runs them whole.
    assert_close(reloaded, logits, torch.float32, FFN_HIDDEN, LAYERS)
    cfg, state = read_export(out_dir)
    assert cfg.learned_memory_scales
    scales = [t for name, t in state.items() if "log_scale" in name]
    # One per KV head and per query head of all 4 layers, each moved by training (from exactly 0).
    assert sorted(t.numel() for t in scales) == [2] * 4 + [4] * 4 and all((t != 0).all() for t in scales)


@pytest.mark.slow
def test_export_cli_and_init_from_export_moves_weights_to_any_layout(stdlib_shards, tmp_path):
    run_dir = str(tmp_path / "tp1")
    out_dir = str(tmp_path / "export")
    run_distributed(
        losses_worker,
        1,
        train_overrides(stdlib_shards, run_dir, **{"schedule.steps": 2, "checkpoint.save_at_end": True}),
    )
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.export",
            "--checkpoint",
            os.path.join(run_dir, "checkpoints", "step_00000002"),
            "--out",
            out_dir,
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    assert sorted(os.listdir(out_dir)) == ["model.safetensors", "model_config.yaml"]
    # The exported weights start a run on any layout: the first loss is the same on TP1 and TP2xPP2.
    first = {}
    for world, extra in ((1, {}), (4, {"parallel.tensor": 2, "parallel.pipeline": 2})):
        overrides = train_overrides(
            stdlib_shards,
            str(tmp_path / f"new{world}"),
            **{"schedule.steps": 1, "schedule.warmup_steps": 0, "checkpoint.init_from": out_dir, "seed": 99, **extra},
        )
        first[world] = run_distributed(losses_worker, world, overrides)[0][0][1]
    assert first[1] == pytest.approx(first[4], rel=tolerance(torch.float32, STEP_TOKENS, LAYERS))
    untrained = run_distributed(
        losses_worker,
        1,
        train_overrides(
            stdlib_shards, str(tmp_path / "fresh"), **{"schedule.steps": 1, "schedule.warmup_steps": 0, "seed": 99}
        ),
    )[0][0][1]
    assert abs(untrained - first[1]) > 1e-3  # the export, not the seed, set the weights
    # And they are what trains: at a vanishing LR two steps later the weights are still the export's
    # (DeepSpeed's fp32 master weights must have been taken from them, not from the fresh init).
    after = str(tmp_path / "after")
    run_distributed(
        export_worker,
        1,
        train_overrides(
            stdlib_shards,
            str(tmp_path / "tiny_lr"),
            **{
                "schedule.steps": 2,
                "schedule.warmup_steps": 0,
                "checkpoint.init_from": out_dir,
                "seed": 99,
                "optimizer.lr": 1e-12,
                "optimizer.min_lr": 1e-12,
                "optimizer.gate_lr": 1e-12,
            },
        ),
        after,
    )
    _, want = read_export(out_dir)
    _, got = read_export(after)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)
