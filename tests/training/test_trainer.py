"""Memory carried across steps, recomputation, non-finite steps, validation, config errors, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.recording import record
from tests.tolerance import assert_close, tolerance
from tests.training.helpers import (
    LAYERS,
    STEP_TOKENS,
    fit_worker,
    losses_worker,
    single_process_env,
    train_overrides,
)


def step_losses(world, overrides):
    """Rank 0's per-step losses of a tiny run on world processes."""
    return [loss for _, loss in run_distributed(losses_worker, world, overrides)[0]]


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_worker(rank, world, overrides, carry):
    """One process, no schedule, no DeepSpeed: each lane's windows in order through the plain model."""
    from data_pipeline import build_train_loader
    from modeling.cpu_compat import megatron_on_cpu
    from training.config import load_config, loader_config
    from training.distributed import init_distributed, init_model_parallel
    from training.train import build_stage_model

    cfg = load_config(None, overrides)
    init_distributed()
    init_model_parallel(1, 1)
    model = build_stage_model(cfg, bf16=False)[0]
    model.eval()
    loader = build_train_loader(loader_config(cfg), 0, 1)
    memory = [None] * cfg.data.global_lanes
    losses = []
    with torch.no_grad(), megatron_on_cpu():
        for _ in range(cfg.schedule.steps):
            batch = next(loader)
            total, tokens = 0.0, 0.0
            for lane in range(cfg.data.global_lanes):
                row = slice(lane, lane + 1)
                per_token, new_memory = model(
                    batch["tokens"][row], batch["labels"][row], memory[lane] if carry else None, batch["reset"][row]
                )
                memory[lane] = new_memory
                total += (per_token * batch["loss_mask"][row]).sum().item()
                tokens += batch["loss_mask"][row].sum().item()
            losses.append(total / tokens)
    loader.close()
    return losses


@pytest.mark.slow
def test_memory_carries_per_lane_across_steps(stdlib_shards, tmp_path):
    # A vanishing learning rate keeps the weights fixed, so losses depend only on data and memory.
    overrides = train_overrides(
        stdlib_shards,
        str(tmp_path),
        **{
            "schedule.steps": 3,
            "optimizer.lr": 1e-12,
            "optimizer.min_lr": 0.0,
            "optimizer.gate_lr": 1e-12,
            "data.global_lanes": 4,
            "parallel.micro_batch_lanes": 2,
            "model.gate_init": 2.0,
            "data.n_segments": 2,
            "data.shuffle_buffer": 1,
        },
    )
    trained = step_losses(2, overrides + ["parallel.pipeline=2"])
    carried = run_distributed(reference_worker, 1, overrides, True)[0]
    fresh = run_distributed(reference_worker, 1, overrides, False)[0]
    # Forward only (the weights stay put): each lane's tokens against the batch's, through every layer of
    # every window the memory carries.
    bound = tolerance(torch.float32, STEP_TOKENS, LAYERS * 3)
    assert_close(trained, carried, torch.float32, STEP_TOKENS, LAYERS * 3)
    # The first window starts every lane empty; later ones differ once memory is dropped.
    assert trained[0] == pytest.approx(fresh[0], rel=bound)
    assert abs(trained[1] - fresh[1]) > bound * fresh[1] or abs(trained[2] - fresh[2]) > bound * fresh[2]


@pytest.mark.slow
def test_loss_is_the_weighted_mean_with_loss_weights(tmp_path):
    from data_pipeline.make_shards import write_shards
    from tests.data.helpers import weighted_corpus, write_docs

    shards = str(tmp_path / "weighted")
    docs = weighted_corpus(40, seed=5)
    assert write_shards([write_docs(tmp_path / "docs.jsonl", docs)], shards, progress=False)["weighted_documents"]
    overrides = train_overrides(
        shards,
        str(tmp_path / "run"),
        **{
            "schedule.steps": 3,
            "optimizer.lr": 1e-12,
            "optimizer.min_lr": 0.0,
            "optimizer.gate_lr": 1e-12,
            "data.shuffle_buffer": 1,
        },
    )
    trained = step_losses(2, overrides + ["parallel.micro_batch_lanes=2"])
    # The reference sums loss x loss_mask and divides by the sum of loss_mask itself.
    weighted_mean = run_distributed(reference_worker, 1, overrides, True)[0]
    assert_close(trained, weighted_mean, torch.float32, STEP_TOKENS, LAYERS * 3)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["model.recompute", "model.recompute_attention"])
def test_recomputation_gives_identical_losses(stdlib_shards, tmp_path, setting):
    plain = step_losses(1, train_overrides(stdlib_shards, str(tmp_path / "a")))
    recomputed = step_losses(1, train_overrides(stdlib_shards, str(tmp_path / "b"), **{setting: True}))
    assert plain == recomputed  # bitwise: the backward reruns the forward's own operations


def attention_calls_worker(rank, world, overrides):
    """Forward and backward calls of every layer's Infini-attention in one training forward + backward."""
    from modeling.cpu_compat import megatron_on_cpu
    from training.config import load_config
    from training.distributed import init_distributed, init_model_parallel
    from training.train import build_stage_model

    cfg = load_config(None, overrides)
    init_distributed()
    init_model_parallel(1, 1)
    model = build_stage_model(cfg, bf16=False)[0]
    calls = []
    for layer in model.decoder.layers:
        layer.self_attention.core_attention.register_forward_pre_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, 256, (1, 32))
    with megatron_on_cpu():
        loss, _ = model(tokens, tokens)
        forward_calls = len(calls)
        loss.sum().backward()
    return forward_calls, len(calls)


@pytest.mark.parametrize("selective", [False, True])
def test_selective_recompute_reruns_only_the_attention_in_backward(stdlib_shards, tmp_path, selective):
    overrides = train_overrides(stdlib_shards, str(tmp_path), **{"model.recompute_attention": selective})
    forward_calls, all_calls = run_distributed(attention_calls_worker, 1, overrides)[0]
    assert forward_calls == 4  # one per layer
    assert all_calls == (8 if selective else 4)


def nonfinite_worker(rank, world, overrides):
    from modeling.sharding import full_state_dict
    from training.config import load_config
    from training.train import NonFiniteLossError, Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    batches = iter(trainer.train_loader)
    weights, outcome = [], None
    try:
        for _ in range(trainer.cfg.schedule.steps):
            trainer.log(trainer.train_step(next(batches)))
            weights.append({k: v.clone() for k, v in full_state_dict(trainer.model).items()})
    except NonFiniteLossError as error:
        outcome = str(error)
    finally:
        trainer.close()
    return dict(history=history, weights=weights, outcome=outcome)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_stop_the_run(stdlib_shards, tmp_path):
    overrides = train_overrides(
        stdlib_shards,
        str(tmp_path),
        **{"schedule.steps": 8, "max_nonfinite_steps": 3, "debug.inject_nonfinite_at_steps": "[2,4,5,6]"},
    )
    result = run_distributed(nonfinite_worker, 2, overrides + ["parallel.zero_stage=2"])[0]
    history, weights = result["history"], result["weights"]
    # Step 2 is skipped: the weights after it equal those after step 1; step 3 updates again.
    for name in weights[0]:
        assert torch.equal(weights[1][name], weights[0][name]), name
    assert any(not torch.equal(weights[2][n], weights[1][n]) for n in weights[0])
    assert [h["skipped_steps"] for h in history] == [0, 1, 1, 2, 3]
    assert all(torch.isfinite(w).all() for step in weights for w in step.values())
    outcome = result["outcome"]
    assert outcome is not None and "3 consecutive steps" in outcome and "step 6" in outcome


def budget_worker(rank, world, overrides):
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    try:
        finished = trainer.fit()
    finally:
        trainer.close()
    return dict(finished=finished, step=trainer.state.step, logged=[h["step"] for h in history if "loss" in h])


def merged_checkpoint_worker(rank, world, step_dir, export_dir):
    from evals.common import read_checkpoint
    from modeling.export import read_export
    from training.distributed import init_single_process

    init_single_process()
    return read_checkpoint(step_dir)[1], read_export(export_dir)[1]


@pytest.mark.slow
def test_time_budget_ends_the_run_with_a_checkpoint_and_an_export(stdlib_shards, tmp_path):
    run_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    # A budget shorter than any step: every rank stops after the first one.
    overrides = train_overrides(
        stdlib_shards, run_dir, **{"schedule.steps": 50, "schedule.max_minutes": 1e-6, "export.dir": export_dir}
    )
    result = run_distributed(budget_worker, 2, overrides + ["parallel.tensor=2"])
    assert [r["finished"] for r in result] == [True, True] and [r["step"] for r in result] == [1, 1]
    assert result[0]["logged"] == [1]
    step_dir = os.path.join(run_dir, "checkpoints", "step_00000001")
    assert json.load(open(os.path.join(step_dir, "manifest.json")))["reason"] == "time_budget"
    # The export holds the weights the checkpoint saved (merged from DeepSpeed's TP shards on one device).
    saved, exported = run_distributed(merged_checkpoint_worker, 1, step_dir, export_dir)[0]
    assert set(saved) == set(exported)
    for name, tensor in exported.items():
        assert torch.equal(saved[name].float(), tensor), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "speed",
    # Compiled layers whose weight gradients are summed in the GEMM: validation runs them with no main_grad.
    [{}, {"performance.compile_layers": True, "performance.fused_weight_gradients": True}],
    ids=["eager", "compiled-fused-weight-gradients"],
)
def test_validation_loss_is_logged(speed, stdlib_shards, tmp_path):
    overrides = train_overrides(
        stdlib_shards,
        str(tmp_path),
        **{"schedule.steps": 4, "validation.interval": 2, "validation.batches": 2, "data.valid_fraction": 0.2},
        **speed,
    )
    run_distributed(fit_worker, 1, overrides)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    valid = [line for line in lines if "valid/loss" in line]
    assert [line["step"] for line in valid] == [2, 4]
    assert all(0 < line["valid/loss"] < 10 and line["valid/tokens"] > 0 for line in valid)
    assert os.path.exists(tmp_path / "config.yaml")


def run_cli(*args, timeout=600):
    env = single_process_env()
    return subprocess.run(
        [sys.executable, "-m", "training.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hidden_sise=8"], "hidden_sise"),
        (["schedule.steps=many"], "schedule.steps"),
        (
            ["parallel.pipeline=2", "parallel.zero_stage=2", "model.num_layers=2"],
            "zero_stage=2 with parallel.pipeline=2",
        ),
        (["data.segment_length=32"], "data.segment_length is not a key; set model.segment_length"),
        (
            ["model.recompute=true", "model.recompute_attention=true"],
            "model.recompute (whole layers) and model.recompute_attention",
        ),
        (["model.update=hebbian"], "model.update must be one of"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError) as error:
        load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), overrides)
    assert message in str(error.value)


def test_cli_reports_config_errors_and_exits_2():
    result = run_cli("--config", "configs/tiny_cpu.yaml", "optimizer.betas=1")
    assert result.returncode == 2
    assert "optimizer.betas" in result.stderr


@pytest.mark.parametrize("key", ["fused_memory_read", "fused_memory_write"])
def test_cli_refuses_the_fused_memory_kernels_without_a_gpu(tmp_path, key):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the fused kernels")
    result = run_cli("--config", "configs/tiny_cpu.yaml", f"run_dir={tmp_path}", f"performance.{key}=true")
    assert result.returncode == 2
    assert f"performance.{key}" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_unknown_config_file_is_named():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="no/such.yaml"):
        load_config("no/such.yaml")


@pytest.mark.slow
def test_main_job_cli_trains_and_loss_falls(stdlib_shards, tmp_path):
    result = run_cli(
        "--config",
        "configs/tiny_cpu.yaml",
        f"run_dir={tmp_path}",
        "schedule.steps=40",
        "schedule.warmup_steps=5",
        "build_stdlib_shards=false",
        f"data.sources=[{{path: {stdlib_shards}}}]",
        "validation.interval=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 40
    assert any("checkpoint/step" in line for line in lines)  # saved at the end
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert "step     40" in result.stdout
