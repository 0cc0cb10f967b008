"""The passkey recipe script end to end at CPU size: data, TP2 x PP2 training under torchrun (a
short-document phase, then the long documents from its export, then documents of several windows
from that one's, mixed with a share of the long ones) with learned memory scales, export,
passkey with and without memory, the report; run again, it skips what is finished; and the checkpoint
merged on one device equals the export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from evals.passkey import HEADER
from modeling.export import read_export
from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = (
    "model.num_layers=2 model.hidden_size=64 model.num_attention_heads=4 model.num_query_groups=2 "
    "model.ffn_hidden_size=128 model.segment_length=64 data.n_segments=8 "
    "data.global_lanes=4 data.num_workers=0 parallel.micro_batch_lanes=2 parallel.tensor=2 parallel.pipeline=2 "
    "schedule.steps=4 schedule.warmup_steps=1 checkpoint.interval=0 logging.interval=1 "
    "performance.compile_layers=false"
)


def checkpoint_worker(rank, world, out):
    from evals.common import load_model
    from training.distributed import init_single_process

    init_single_process()
    _, exported = read_export(os.path.join(out, "export"))
    model, cfg = load_model(os.path.join(out, "train_long", "checkpoints"))
    merged = {name: p.detach().clone() for name, p in model.named_parameters()}
    return dict(exported=exported, merged=merged, cfg=cfg)


@pytest.mark.slow
def test_passkey_recipe_runs_end_to_end(tmp_path):
    out = str(tmp_path / "passkey")
    env = dict(
        os.environ,
        DOCS="64",
        MAX_LEN="512",
        QUESTIONS="2",
        TRAIN_MINUTES="10",
        SHORT_MINUTES="5",
        SHORT_MIN_LEN="230",
        SHORT_MAX_LEN="300",
        DATA_ARGS="--distractors 1",
        LONG_DATA_ARGS="--distractors 2",
        SHORT_OVERRIDES="model.segment_length=32",
        LONG_MINUTES="5",
        LONG_DOCS="16",
        LONG_MIN_LEN="1100",
        LONG_MAX_LEN="1500",
        LONG_MIX="0.25",
        LENGTHS="256,1k",
        DEPTHS="0,100",
        TRIALS="2",
        BATCH="4",
        TRAIN_OVERRIDES=TINY,
        LAUNCH=f"{sys.executable} -m torch.distributed.run --nproc-per-node 4",
    )

    def run_recipe():
        proc = subprocess.run(
            ["bash", "configs/experiments/passkey_run.sh", out],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    proc = run_recipe()

    for phase in ("train_short", "train", "train_long"):
        with open(os.path.join(out, phase, "metrics.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3, 4]
    assert f"initialised weights from {out}/export_short" in proc.stdout
    assert f"initialised weights from {out}/export_main" in proc.stdout
    with open(os.path.join(out, "data_long", "passkey.jsonl")) as f:
        long_docs = [json.loads(line)["text"] for line in f]
    # Windows of 8 segments of 64: each document spans two or three of them.
    assert all(1100 <= len(text.encode()) < 1500 for text in long_docs)
    # Made with LONG_DATA_ARGS, not phase 2's DATA_ARGS.
    assert all(text.count(" The room number is ") == 2 for text in long_docs)
    # A quarter of phase 3's documents come from phase 2's.
    long_sources = OmegaConf.load(os.path.join(out, "train_long", "config.yaml")).data.sources
    assert [(s.path, s.weight) for s in long_sources] == [
        (f"{out}/data_long/shards", 0.75),
        (f"{out}/data/shards", 0.25),
    ]
    with open(os.path.join(out, "data_short", "passkey.jsonl")) as f:
        short_docs = [json.loads(line)["text"] for line in f]
    # The default short documents: headerless, with three distractors each.
    assert not any(HEADER in text for text in short_docs)
    assert all(text.count(" The room number is ") == 3 for text in short_docs)
    with open(os.path.join(out, "data", "passkey.jsonl")) as f:
        assert all(json.loads(line)["text"].count(" The room number is ") == 1 for line in f)
    with open(os.path.join(out, "export_short", "model_config.yaml")) as f:
        assert "segment_length: 32" in f.read()
    # Both phases learn the memory's scales; the second starts from the first's and moves them on.
    phases = [read_export(os.path.join(out, run))[1] for run in ("export_short", "export_main", "export")]
    scales = sorted(name for name in phases[-1] if "log_scale" in name)
    assert len(scales) == 4 and all(scales == sorted(name for name in p if "log_scale" in name) for p in phases)
    # Every phase trains the scales on from the last one's.
    assert all((phases[0][name] != 0).all() for name in scales)
    assert all(not torch.equal(a[name], b[name]) for a, b in zip(phases, phases[1:]) for name in scales)
    for run in ("passkey", "passkey_ablated"):
        with open(os.path.join(out, run, "passkey.json")) as f:
            result = json.load(f)
        assert result["lengths"] == [256, 1024] and len(result["rows"]) == 8
        assert result["ablate_memory"] == (run == "passkey_ablated")
        assert (result["memory_key_scale"], result["memory_query_scale"]) == (1.0, 1.0)
    report = open(os.path.join(out, "RESULTS.md")).read()
    assert "evaluated with memory key scale 1 and query scale 1 " in report
    assert "1 is the paper's), times the learned per-head scales." in report
    assert "Learned memory scales, mean [min, max] over heads, per layer: 0: key " in report
    assert "Training (train_short): 4 steps" in report and "Training (train): 4 steps" in report
    assert "Training (train_long): 4 steps" in report
    assert "Wall time: " in report and "Memory ablated (gates forced local), by depth:" in report
    assert "| 1K | 16 |" in report  # 1024 tokens are 16 segments of 64

    # Run again, it skips every finished stage and only writes the report, without one command's wall time.
    exported_at = os.path.getmtime(os.path.join(out, "export", "model_config.yaml"))
    again = run_recipe()
    assert "initialised weights" not in again.stdout and "accuracy" not in again.stdout.split("### Passkey")[0]
    assert os.path.getmtime(os.path.join(out, "export", "model_config.yaml")) == exported_at
    rewritten = open(os.path.join(out, "RESULTS.md")).read()
    assert "Training (train): 4 steps" in rewritten and "Wall time: " not in rewritten

    result = run_distributed(checkpoint_worker, 1, out)[0]
    assert result["cfg"].segment_length == 64 and set(result["merged"]) == set(result["exported"])
    for name, tensor in result["exported"].items():
        assert torch.equal(result["merged"][name], tensor), name
