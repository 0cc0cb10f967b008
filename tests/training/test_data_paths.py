"""Data source paths: one that cannot be read is an error at start, naming its config key, before
anything is written; the built-in stdlib shards are written only into their own directory."""

import json
import os
import subprocess
import sys

import pytest

from data_pipeline import SourceConfig
from tests.training.helpers import single_process_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN_JOB = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def run_main_job(cwd, *overrides):
    """The README's first command, run from `cwd` as from a fresh checkout's root."""
    env = single_process_env()
    return subprocess.run(
        [sys.executable, "-m", "training.train", "--config", MAIN_JOB, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_mistyped_source_path_fails_at_start_and_writes_nothing(tmp_path):
    result = run_main_job(
        tmp_path, "data.sources=[{path: runs/data/pyton-stdlib}]", "schedule.steps=1", "schedule.warmup_steps=0"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config error: data.sources[0].path: runs/data/pyton-stdlib does not exist" in result.stderr
    assert os.listdir(tmp_path) == []


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()


@pytest.mark.parametrize(
    "overrides, sources, prepare, message",
    [
        (["data.valid_sources=[{path: nowhere}]"], None, None, "data.valid_sources[0].path: nowhere does not exist"),
        (
            [],
            [SourceConfig("shard-{000000..000003}.tar", index="nowhere/index.json")],
            None,
            "data.sources[0].index: nowhere/index.json does not exist",
        ),
        (["data.sources=[{path: empty}]"], None, _empty_dir, "data.sources[0].path: empty holds no index.json"),
        (
            ["build_stdlib_shards=false"],
            None,
            None,
            "data.sources[0].path: runs/data/python-stdlib does not exist (build_stdlib_shards=true writes",
        ),
    ],
)
def test_unreadable_sources_are_named_before_anything_is_written(
    tmp_path, monkeypatch, overrides, sources, prepare, message
):
    from training.config import ConfigError, load_config
    from training.train import prepare_data

    monkeypatch.chdir(tmp_path)
    if prepare:
        prepare(tmp_path)
    before = sorted(os.listdir(tmp_path))
    cfg = load_config(MAIN_JOB, overrides)
    if sources:
        cfg.data.sources = sources
    with pytest.raises(ConfigError) as error:
        prepare_data(cfg)
    assert message in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow
def test_the_main_job_builds_the_stdlib_shards_in_their_own_directory_and_trains(tmp_path):
    result = run_main_job(
        tmp_path,
        "schedule.steps=2",
        "schedule.warmup_steps=1",
        "checkpoint.save_at_end=false",
        "logging.wandb.mode=disabled",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.load(open(tmp_path / "runs" / "data" / "python-stdlib" / "index.json"))
    assert index["created_by"]["source"] == "python-stdlib" and index["n_documents"] > 1000
    assert sorted(os.listdir(tmp_path / "runs")) == ["data", "tiny_cpu"]
    losses = [json.loads(line) for line in open(tmp_path / "runs" / "tiny_cpu" / "metrics.jsonl")]
    assert [m["step"] for m in losses if "loss" in m] == [1, 2]
