import os

import pytest


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory):
    """A few hundred standard-library files as byte-level shards, shared by the training tests."""
    from data_pipeline.make_shards import build_stdlib_shards

    out = tmp_path_factory.mktemp("stdlib") / "shards"
    build_stdlib_shards(str(out), max_files=300)
    return str(out)


def train_overrides(shards: str, run_dir: str, **extra) -> list:
    """A tiny fp32 run: 4 global lanes, 2 segments of 16 tokens a window."""
    base = {
        "run_dir": run_dir,
        "precision": "fp32",
        "model.num_layers": 4,
        "model.hidden_size": 32,
        "model.num_attention_heads": 4,
        "model.num_query_groups": 2,
        "model.ffn_hidden_size": 64,
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


os.environ.setdefault("DS_ACCELERATOR", "cpu")
