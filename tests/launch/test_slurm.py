"""launch.slurm on a real 2-node SLURM cluster: gloo jobs, preemption with requeue and resume (USR1 to the batch shell
or to the ranks), cancellation, starts without progress, W&B offline runs."""

import glob
import json
import os
import shlex
import struct
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.helpers import losses_worker, train_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Long enough that a USR1 sent after the first step lands before the last: at 20 steps a job once
# finished before the signal reached it.
STEPS = 60
HEATMAP_INTERVAL = 4
pytestmark = pytest.mark.slow

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def overrides(shards, run_dir, **extra):
    return train_overrides(shards, run_dir, **{"schedule.steps": STEPS, "checkpoint.save_at_end": True, **extra})


def launcher(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "launch.slurm", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def submit(config, args):
    result = launcher("submit", "--config", config, "--nodes", "2", "--gpus-per-node", "0", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def job_fields(job_id):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def outcome(run_dir):
    return json.load(open(os.path.join(run_dir, "outcome.json")))


def log_of(run_dir, job_id):
    path = os.path.join(run_dir, f"slurm-{job_id}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def wait_until(condition, timeout, what, run_dir, job_id):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"timed out waiting for {what}; job log:\n{log_of(run_dir, job_id)[-5000:]}")


def wait_for_end(run_dir, job_id, timeout=300):
    def ended():
        fields = job_fields(job_id)
        return fields if fields["JobState"] in FINAL_STATES else None

    return wait_until(ended, timeout, f"job {job_id} to end", run_dir, job_id)


def metrics_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if line.endswith("\n") and '"loss"' in line]


def losses(run_dir):
    return [
        (line["step"], line["loss"])
        for line in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
        if "loss" in line
    ]


def wandb_records(path):
    """The records of an offline run file: a 7-byte W&B header, then LevelDB log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history_rows(path):
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("# Everything else comes from the tests' key=value overrides.\nprecision: fp32\n")
    return str(path)


@pytest.fixture(scope="module")
def straight_job(slurm_cluster, stdlib_shards, tiny_config, tmp_path_factory):
    """An uninterrupted 2-node x 1-task gloo job, W&B disabled."""
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    job_id = submit(tiny_config, overrides(stdlib_shards, run_dir))
    return run_dir, job_id, wait_for_end(run_dir, job_id)


def test_dry_run_renders_a_4x8_gpu_job(tmp_path):
    run_dir = str(tmp_path / "big")
    result = launcher(
        "submit",
        "--config",
        "configs/gpu_1.3b.yaml",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--account",
        "llm",
        "--time",
        "24:00:00",
        "--qos",
        "high",
        "--dry-run",
        f"run_dir={run_dir}",
        "parallel.tensor=4",
        "data.sources=[{path: /data/web}]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=big",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=llm",
        "#SBATCH --time=24:00:00",
        "#SBATCH --qos=high",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
    ]
    srun = shlex.split(script[script.index("\nsrun ") : script.index(" &\n")].replace("\\\n", " "))
    assert srun == [
        "srun",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "training.train",
        "--config",
        os.path.join(REPO, "configs", "gpu_1.3b.yaml"),
        "--stopped-exit-code",
        "0",
        "parallel.tensor=4",
        "data.sources=[{path: /data/web}]",
        f"run_dir={run_dir}",
        "$resume",
    ]
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))" in script
    assert 'export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"' in script
    assert f"run_dir={run_dir}\n" in script
    assert "own_extensions_dir=$run_dir/torch_extensions/job-$SLURM_JOB_ID" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not os.path.exists(run_dir)  # a dry run writes and submits nothing


def test_first_start_resumes_or_starts_over_as_asked_and_a_requeued_one_resumes(tmp_path):
    def first_and_requeued(*extra):
        result = launcher(
            "submit",
            "--config",
            "configs/gpu_1.3b.yaml",
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--dry-run",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.splitlines()
        first = next(line for line in lines if line.startswith("resume="))
        requeued = next(line for line in lines if "SLURM_RESTART_COUNT" in line and "resume=" in line)
        srun_overrides = result.stdout.split("\nsrun ")[1].split("$resume")[0]
        assert "checkpoint.resume" not in srun_overrides and "checkpoint.start_over" not in srun_overrides
        return first, requeued

    requeued = 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=checkpoint.resume=auto; fi'
    assert first_and_requeued() == ("resume=checkpoint.resume=auto", requeued)
    assert first_and_requeued("checkpoint.resume=/ckpt/step_00000100") == (
        "resume=checkpoint.resume=/ckpt/step_00000100",
        requeued,
    )
    # Starting over applies to the first start only: a requeued start must not remove the job's own checkpoints.
    assert first_and_requeued("checkpoint.start_over=true") == ("resume=checkpoint.start_over=true", requeued)


def test_dry_run_rejects_a_layout_the_config_cannot_split():
    result = launcher(
        "submit", "--config", "configs/gpu_125m.yaml", "--nodes", "4", "--gpus-per-node", "8", "--dry-run"
    )
    assert result.returncode == 2
    assert "lanes per data-parallel rank (1) must be divisible by parallel.micro_batch_lanes (8)" in result.stderr


def test_two_node_gloo_job_completes(straight_job, stdlib_shards, tiny_config, tmp_path):
    run_dir, job_id, fields = straight_job
    state = (fields["JobState"], fields["ExitCode"], fields["Restarts"])
    assert state == ("COMPLETED", "0:0", "0"), log_of(run_dir, job_id)
    assert (fields["NumNodes"], fields["NumTasks"], fields["NodeList"]) == ("2", "2", "node[1-2]")
    assert fields["Command"] == os.path.join(run_dir, "sbatch.sh")
    log = log_of(run_dir, job_id)
    assert f"rendezvous node1:{20000 + int(job_id) % 10000}" in log

    # Both ranks took part: each saved its own lanes in the checkpoint.
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}")
    manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
    assert manifest["layout"]["world_size"] == 2 and manifest["layout"]["data"] == 2
    states = [torch.load(os.path.join(ckpt, f"rank_{r:05d}.pt"), weights_only=False) for r in range(2)]
    assert [s["coordinates"]["rank"] for s in states] == [0, 1]
    assert not set(states[0]["lane_ids"]) & set(states[1]["lane_ids"])

    # The same run started by plain processes (no SLURM) gives the same losses, bitwise: the same layout and one
    # thread a process on both sides (the job's OMP_NUM_THREADS, run_distributed's), so the same sums in order.
    reference = run_distributed(losses_worker, 2, overrides(stdlib_shards, str(tmp_path / "reference")), tiny_config)[0]
    assert losses(run_dir) == reference

    status = launcher("status", job_id)
    assert "JobState=COMPLETED" in status.stdout and "Restarts=0" in status.stdout
    assert launcher("logs", job_id, "-n", "1").stdout == "training finished\n"


def test_preemption_requeues_and_resumes_in_one_wandb_run(straight_job, stdlib_shards, tiny_config, tmp_path):
    run_dir = str(tmp_path / "run")
    job_id = submit(
        tiny_config,
        overrides(
            stdlib_shards,
            run_dir,
            **{"logging.wandb.mode": "offline", "logging.wandb.gate_heatmap_interval": HEATMAP_INTERVAL},
        ),
    )
    wait_until(lambda: metrics_steps(run_dir), 300, "the first training step", run_dir, job_id)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)  # what --signal=B:USR1@T sends
    fields = wait_for_end(run_dir, job_id)
    log = log_of(run_dir, job_id)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), log

    # Stopped at some step k with a checkpoint, resumed from it, and the losses are those of the straight run.
    logged = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    stop = next(line["checkpoint/step"] for line in logged if "checkpoint/step" in line)
    assert 1 <= stop < STEPS
    manifest = json.load(open(os.path.join(run_dir, "checkpoints", f"step_{stop:08d}", "manifest.json")))
    assert manifest["reason"] == "signal"
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'step_{stop:08d}')} at step {stop}" in log
    assert f"training stopped by USR1 at step {stop} ({stop} steps in this start)" in log
    assert losses(run_dir) == losses(straight_job[0])
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))

    # One W&B run across both starts: an offline run dir per start, one run id, steps continuing.
    files = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2
    ids = {os.path.basename(path)[len("run-") : -len(".wandb")] for path in files}
    run_records = [r.run for path in files for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    assert len(ids) == 1 and {r.run_id for r in run_records} == ids
    assert {r.display_name for r in run_records} == {"run"}  # the run directory's name
    saved_id = torch.load(
        os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}", "rank_00000.pt"), weights_only=False
    )["wandb_run_id"]
    assert ids == {saved_id}
    config = {item.key: json.loads(item.value_json) for item in run_records[0].config.update}
    assert config["run_dir"] == run_dir and config["model"]["hidden_size"] == 32

    starts = [history_rows(path) for path in files]
    assert [row["_step"] for row in starts[0]] == list(range(1, stop + 1))
    assert [row["_step"] for row in starts[1]] == list(range(stop + 1, STEPS + 1))
    rows = starts[0] + starts[1]
    assert [(row["_step"], row["loss"]) for row in rows] == losses(straight_job[0])
    for row in rows:
        for key in (
            "lr",
            "grad_norm",
            "tokens_per_s",
            "padding_fraction",
            "skipped_steps",
            "gate_mean",
            "memory_max_norm",
            *(f"gate/layer_{i}" for i in range(4)),
        ):
            assert key in row, (row["_step"], key)
    assert [row["_step"] for row in rows if "checkpoint/step" in row] == [stop, STEPS]
    heatmaps = [row for row in rows if "gate/heatmap/_type" in row]
    assert [row["_step"] for row in heatmaps] == list(range(HEATMAP_INTERVAL, STEPS + 1, HEATMAP_INTERVAL))
    # 4 layers x 4 heads, 16 pixels a cell; the PNG is in the run's media.
    assert all((row["gate/heatmap/height"], row["gate/heatmap/width"]) == (64, 64) for row in heatmaps)
    for row in heatmaps:
        start = files[0] if row["_step"] <= stop else files[1]
        assert os.path.exists(os.path.join(os.path.dirname(start), "files", row["gate/heatmap/path"]))


def test_cancel_checkpoints_and_does_not_requeue(slurm_cluster, stdlib_shards, tiny_config, tmp_path):
    run_dir = str(tmp_path / "run")
    # W&B on: SIGTERM reaches its service process too, and the checkpoint must not depend on it.
    job_id = submit(
        tiny_config, overrides(stdlib_shards, run_dir, **{"schedule.steps": 100000, "logging.wandb.mode": "offline"})
    )
    wait_until(lambda: metrics_steps(run_dir), 300, "the first training step", run_dir, job_id)
    assert launcher("cancel", job_id).returncode == 0
    fields = wait_for_end(run_dir, job_id)
    # A requeue by the batch script would have made it PENDING again instead.
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "0"), log_of(run_dir, job_id)
    manifests = glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "manifest.json"))
    assert [json.load(open(path))["reason"] for path in manifests] == ["signal"]
    # The trainer's account: stopped by TERM at the step it saved.
    ended = outcome(run_dir)
    assert (ended["outcome"], ended["signal"]) == ("stopped", "SIGTERM")
    assert ended["checkpoint"] == os.path.dirname(manifests[0]) and ended["step"] >= 1


def test_usr1_to_the_ranks_requeues_and_resumes(straight_job, stdlib_shards, tiny_config, tmp_path):
    run_dir = str(tmp_path / "run")
    job_id = submit(tiny_config, overrides(stdlib_shards, run_dir))
    wait_until(lambda: metrics_steps(run_dir), 300, "the first training step", run_dir, job_id)
    # To the job's steps, not the batch shell: only the ranks know, and their outcome tells the script.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    fields = wait_for_end(run_dir, job_id, timeout=600)
    log = log_of(run_dir, job_id)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stop = next(
        json.loads(line)["checkpoint/step"]
        for line in open(os.path.join(run_dir, "metrics.jsonl"))
        if "checkpoint/step" in line
    )
    assert 1 <= stop < STEPS
    assert f"training stopped by USR1 at step {stop}" in log and "training finished" in log
    assert outcome(run_dir) == {
        "outcome": "finished",
        "signal": None,
        "start_step": stop,
        "step": STEPS,
        "checkpoint": os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}"),
    }
    assert losses(run_dir) == losses(straight_job[0])


def test_starts_stopped_before_their_first_step_are_not_requeued_forever(
    slurm_cluster, stdlib_shards, tiny_config, tmp_path
):
    run_dir = str(tmp_path / "run")
    # The ranks wait 20 s before their first step: the signal, forwarded within 5 s of srun's start, comes
    # before it however fast they start.
    job_id = submit(
        tiny_config,
        [
            "--max-requeues-without-progress",
            "0",
            *overrides(stdlib_shards, run_dir, **{"debug.pause_before_training_s": 20}),
        ],
    )
    wait_until(lambda: f"job {job_id} (restart 0)" in log_of(run_dir, job_id), 300, "the batch script", run_dir, job_id)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    fields = wait_for_end(run_dir, job_id)
    log = log_of(run_dir, job_id)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "1:0", "0"), log
    assert "error: 1 starts in a row were stopped by USR1 before finishing a step; not requeueing." in log
    assert metrics_steps(run_dir) == []
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    assert "Traceback" not in log
