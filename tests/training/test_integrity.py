"""Checkpoint integrity and run-directory hygiene: every file's CRC-32 checked before a resume (a corrupt file of
each kind is named), resume=auto naming what it skips, a fresh run refusing another run's checkpoints, every
numeric config key's range, and metrics.jsonl holding each step once across a kill and a resume."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import typing

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.helpers import fit_worker, losses_worker, train_overrides
from training.checkpoint_layout import CheckpointError, check_format, verify
from training.config import NUMERIC_RANGES, STEP_LISTS, ConfigError, TrainConfig, load_config, validate

STEPS = 6
SAVED = "step_00000002"
"""The one checkpoint the killed run finalized."""
CORRUPTED = {
    "model states": os.path.join("ds", "mp_rank_00_model_states.pt"),
    "ZeRO optimizer shard": os.path.join("ds", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "rank file": "rank_00001.pt",
    "config": "config.yaml",
}


def flip_bytes(path: str, offset: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture(scope="module")
def killed_run(stdlib_shards, tmp_path_factory):
    """Two data-parallel ranks (ZeRO-1) saving every 2 steps, rank 0 killed during the save of step 4: step 2
    is finalized, step 4's save is left unfinished, metrics.jsonl holds steps 1 to 4."""
    run_dir = str(tmp_path_factory.mktemp("killed") / "run")
    overrides = train_overrides(
        stdlib_shards,
        run_dir,
        **{"schedule.steps": STEPS, "checkpoint.interval": 2, "debug.inject_kill_during_save_at_steps": "[4]"},
    )
    with pytest.raises(RuntimeError, match="exit code -9|rank 0"):
        run_distributed(losses_worker, 2, overrides, timeout=300)
    checkpoints = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == [".tmp-step_00000004", "latest", SAVED]
    return run_dir


def start_attempts(rank, world, attempts):
    """Build (and close) a Trainer for each (name, overrides): name -> (its start step or the error that stopped
    it, what it printed)."""
    from training.checkpoint_layout import CheckpointError
    from training.config import ConfigError, load_config
    from training.train import Trainer

    outcomes = {}
    for name, overrides in attempts:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                trainer = Trainer(load_config(None, overrides))
            except (CheckpointError, ConfigError) as error:
                outcome = str(error)
            else:
                outcome = trainer.state.step
                trainer.close()
        outcomes[name] = (outcome, printed.getvalue())
    return outcomes


def copy_run(run_dir: str, to: str) -> str:
    shutil.copytree(run_dir, to)
    return to


@pytest.fixture(scope="module")
def attempts(killed_run, stdlib_shards, tmp_path_factory):
    """Starts on copies of the killed run, all in one pair of processes: resumes from a checkpoint with one file
    corrupted (one per kind of file, and 64 bytes of the fp32 master partition), resume=auto past a corrupt
    newer checkpoint, a nonexistent path, fresh starts among the old checkpoints."""
    root = tmp_path_factory.mktemp("attempts")
    runs, corrupted = {}, {}

    def overrides(name, **extra):
        return train_overrides(stdlib_shards, runs[name], **{"schedule.steps": STEPS, **extra})

    for kind, rel in CORRUPTED.items():
        runs[kind] = copy_run(killed_run, str(root / kind.replace(" ", "_")))
        corrupted[kind] = os.path.join(runs[kind], "checkpoints", SAVED, rel)
        flip_bytes(corrupted[kind], os.path.getsize(corrupted[kind]) // 2, 1)

    # 64 bytes inside the fp32 master weights of data-parallel rank 1: the file still loads, size unchanged.
    runs["master"] = copy_run(killed_run, str(root / "master"))
    shard = os.path.join(runs["master"], "checkpoints", SAVED, CORRUPTED["ZeRO optimizer shard"])
    masters = torch.load(shard, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    with open(shard, "rb") as f:
        offset = f.read().find(masters.detach().numpy().tobytes()[:256])
    assert offset > 0
    size = os.path.getsize(shard)
    flip_bytes(shard, offset + 128, 64)
    corrupted["master"] = shard
    reloaded = torch.load(shard, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    assert os.path.getsize(shard) == size and (reloaded != masters).sum().item() == 16

    # resume=auto: the latest checkpoint (a copy of step 2 renamed step 3, one byte of its model states flipped)
    # is skipped, as is the unfinished save of step 4; step 2 resumes.
    runs["auto"] = copy_run(killed_run, str(root / "auto"))
    checkpoints = os.path.join(runs["auto"], "checkpoints")
    shutil.copytree(os.path.join(checkpoints, SAVED), os.path.join(checkpoints, "step_00000003"))
    with open(os.path.join(checkpoints, "latest"), "w") as f:
        f.write("step_00000003")
    corrupted["auto"] = os.path.join(checkpoints, "step_00000003", CORRUPTED["model states"])
    flip_bytes(corrupted["auto"], 1000, 1)
    runs["fresh"] = copy_run(killed_run, str(root / "fresh"))
    runs["start_over"] = copy_run(killed_run, str(root / "start_over"))

    explicit = [
        (kind, overrides(kind, **{"checkpoint.resume": os.path.join(runs[kind], "checkpoints", SAVED)}))
        for kind in [*CORRUPTED, "master"]
    ]
    outcomes = run_distributed(
        start_attempts,
        2,
        explicit
        + [
            ("auto", overrides("auto", **{"checkpoint.resume": "auto"})),
            ("nonexistent", overrides("fresh", **{"checkpoint.resume": str(root / "nonexistent")})),
            ("fresh", overrides("fresh")),
            ("start_over", overrides("start_over", **{"checkpoint.start_over": True})),
        ],
        timeout=600,
    )
    # Every rank comes to the same end.
    assert {name: outcome for name, (outcome, _) in outcomes[0].items()} == {
        name: outcome for name, (outcome, _) in outcomes[1].items()
    }
    return outcomes[0], runs, corrupted


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*CORRUPTED, "master"])
def test_a_corrupt_file_is_named_before_resuming(attempts, kind):
    outcomes, _, corrupted = attempts
    message, _ = outcomes[kind]
    assert isinstance(message, str), f"resumed at step {message} from a checkpoint with {corrupted[kind]} corrupt"
    assert f"checkpoint file corrupt: {corrupted[kind]} has CRC-32" in message


@pytest.mark.slow
def test_auto_resumes_from_the_newest_that_verifies_naming_each_one_skipped(attempts):
    outcomes, runs, corrupted = attempts
    step, printed = outcomes["auto"]
    checkpoints = os.path.join(runs["auto"], "checkpoints")
    assert step == 2
    assert f"skipping {os.path.join(checkpoints, '.tmp-step_00000004')}: an unfinished save" in printed
    assert (
        f"skipping {os.path.join(checkpoints, 'step_00000003')}: checkpoint file corrupt: {corrupted['auto']}"
        in printed
    )
    assert f"resumed from {os.path.join(checkpoints, SAVED)} at step 2" in printed


@pytest.mark.slow
def test_a_checkpoint_of_an_unread_format_says_how_to_carry_its_weights_over():
    with pytest.raises(CheckpointError, match=r"runs/x/step_00000010 has checkpoint format 1; .*checkpoint\.init_from"):
        check_format("runs/x/step_00000010", {"format": 1})


def test_a_nonexistent_resume_path_is_named(attempts):
    message, _ = attempts[0]["nonexistent"]
    assert isinstance(message, str) and message.endswith("nonexistent: the path does not exist")


@pytest.mark.slow
def test_a_fresh_run_refuses_another_runs_checkpoints_unless_told_to_start_over(attempts):
    outcomes, runs, _ = attempts
    message, _ = outcomes["fresh"]
    checkpoints = os.path.join(runs["fresh"], "checkpoints")
    assert isinstance(message, str) and f"{checkpoints} holds the checkpoints of an earlier run" in message
    assert "checkpoint.resume=auto" in message and "checkpoint.start_over=true" in message
    # Nothing of the earlier run was touched.
    assert sorted(os.listdir(checkpoints)) == [".tmp-step_00000004", "latest", SAVED]
    step, printed = outcomes["start_over"]
    checkpoints = os.path.join(runs["start_over"], "checkpoints")
    assert step == 0 and f"removed 1 checkpoints of an earlier run from {checkpoints}" in printed
    assert os.listdir(checkpoints) == []
    assert os.path.getsize(os.path.join(runs["start_over"], "metrics.jsonl")) == 0


def metrics_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_metrics_hold_each_step_once_after_a_kill_and_a_resume(killed_run, stdlib_shards):
    before = [row for row in metrics_rows(killed_run) if "loss" in row]
    assert [row["step"] for row in before] == [1, 2, 3, 4]
    history = run_distributed(
        fit_worker,
        2,
        train_overrides(
            stdlib_shards,
            killed_run,
            **{"schedule.steps": STEPS, "checkpoint.interval": 2, "checkpoint.resume": "auto"},
        ),
    )[0]
    rows = metrics_rows(killed_run)
    losses = [row for row in rows if "loss" in row]
    assert [row["step"] for row in losses] == list(range(1, STEPS + 1))
    assert losses[:2] == before[:2]
    assert [(row["step"], row["loss"]) for row in losses[2:]] == [
        (h["step"], h["loss"]) for h in history if "loss" in h
    ]
    assert max(row["step"] for row in rows) == STEPS
    verify(os.path.join(killed_run, "checkpoints", f"step_{STEPS:08d}"))


BAD_VALUES = {
    "data.global_lanes": -8,
    "data.n_segments": 0,
    "data.num_workers": -1,
    "data.prefetch": 0,
    "data.shuffle_buffer": 0,
    "data.valid_fraction": 1.0,
    "parallel.micro_batch_lanes": 0,
    "parallel.tensor": 0,
    "parallel.pipeline": -1,
    "optimizer.grad_clip": -1,
    "optimizer.lr": 0,
    "optimizer.beta1": 1.0,
    "optimizer.beta2": -0.1,
    "optimizer.eps": 0,
    "optimizer.weight_decay": -0.1,
    "checkpoint.interval": -1,
    "checkpoint.keep_last": 0,
    "logging.interval": 0,
    "validation.interval": -5,
    "max_nonfinite_steps": 0,
    "schedule.max_minutes": 0,
    "seed": -1,
}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_numeric_key_out_of_range_is_named_with_its_value(key):
    with pytest.raises(ConfigError, match=rf"^{key} must be .*, got {BAD_VALUES[key]}"):
        load_config(None, [f"{key}={BAD_VALUES[key]}"])


def numeric_keys(schema, prefix=""):
    """Every int or float key of a structured config class, recursively; a list's elements as ``key[]``."""
    keys = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        kind, name = hints[field.name], prefix + field.name
        if typing.get_origin(kind) is list:
            kind, name = typing.get_args(kind)[0], name + "[]"
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X]: X
        if dataclasses.is_dataclass(kind):
            keys += numeric_keys(kind, name + ".")
        elif kind in (int, float):
            keys.append(name)
    return keys


def test_every_numeric_key_outside_the_model_has_a_range():
    keys = {key for key in numeric_keys(TrainConfig) if not key.startswith("model.")}
    checked = {
        *NUMERIC_RANGES,
        *(key + "[]" for key in STEP_LISTS),
        "data.sources[].weight",
        "data.valid_sources[].weight",
    }
    assert keys - checked == {"parallel.zero_stage"}  # a choice, with its own rule and message
    assert checked <= keys


def test_rules_between_keys():
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps \(30\) must be at most schedule.steps \(20\)"):
        load_config(None, ["schedule.steps=20", "schedule.warmup_steps=30"])
    with pytest.raises(ConfigError, match="zero_stage=2 with parallel.pipeline=2: .* use parallel.zero_stage=1"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=2", "model.num_layers=4"])
    with pytest.raises(ConfigError, match="parallel.zero_stage must be 1, 2 or 3, got 0"):
        load_config(None, ["parallel.zero_stage=0"])
    with pytest.raises(ConfigError, match="checkpoint.start_over=true .* checkpoint.resume=auto"):
        load_config(None, ["checkpoint.start_over=true", "checkpoint.resume=auto"])
    cfg = load_config(None, ["data.global_lanes=6"])
    with pytest.raises(ConfigError, match=r"data.global_lanes \(6\) must be divisible by the data-parallel size \(4\)"):
        validate(cfg, world_size=4)
