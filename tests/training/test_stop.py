"""Stopping on USR1/TERM: the trainer's CLI as a real process, signalled during training, as a process group with
DataLoader workers, and before its first step; a signal during validation or a save; stale extension-build locks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed import free_port, run_distributed
from tests.recording import record
from tests.training.helpers import train_overrides
from training.build_locks import BuildLockWatch, stale_locks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 10


@pytest.fixture(scope="module")
def cli(stdlib_shards, tmp_path_factory):
    """Start the trainer's CLI on a tiny fp32 run with two DataLoader workers."""
    config = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config.write_text("# Everything else comes from the tests' key=value overrides.\nprecision: fp32\n")

    def start(run_dir, env=None, **extra):
        env = dict(
            os.environ,
            PYTHONPATH=REPO,
            WORLD_SIZE="1",
            RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            **(env or {}),
        )
        overrides = train_overrides(stdlib_shards, run_dir, **{"schedule.steps": STEPS, "data.num_workers": 2, **extra})
        # A session of its own: the test can signal its whole process group, as scancel and torchrun do.
        return subprocess.Popen(
            [sys.executable, "-m", "training.train", "--config", str(config), *overrides],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    return start


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def losses(run_dir):
    return [
        (line["step"], line["loss"])
        for line in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
        if "loss" in line
    ]


def outcome(run_dir):
    return json.load(open(os.path.join(run_dir, "outcome.json")))


def wait_for_steps(run_dir, process, steps, timeout=300):
    path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and sum('"loss"' in line for line in open(path)) >= steps:
            return
        assert process.poll() is None, finish(process)
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no {steps} steps in {timeout} s")


@pytest.fixture(scope="module")
def straight(cli, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    status, out, err = finish(cli(run_dir))
    assert status == 0, err[-3000:]
    assert outcome(run_dir) == {
        "outcome": "finished",
        "signal": None,
        "start_step": 0,
        "step": STEPS,
        "checkpoint": None,
    }
    return losses(run_dir)


@pytest.mark.slow
def test_usr1_during_training_saves_the_last_step_and_resumes_exactly(cli, straight, tmp_path):
    run_dir = str(tmp_path / "run")
    process = cli(run_dir)
    wait_for_steps(run_dir, process, 3)
    process.send_signal(signal.SIGUSR1)
    status, out, err = finish(process)
    assert status == 75, err[-3000:]
    stopped = outcome(run_dir)
    step = stopped["step"]
    assert 3 <= step < STEPS
    checkpoint = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    assert stopped == {
        "outcome": "stopped",
        "signal": "SIGUSR1",
        "start_step": 0,
        "step": step,
        "checkpoint": checkpoint,
    }
    assert json.load(open(os.path.join(checkpoint, "manifest.json")))["reason"] == "signal"
    assert [s for s, _ in losses(run_dir)] == list(range(1, step + 1))  # the last finished step is the saved one
    assert f"stopped on SIGUSR1 at step {step}, saved" in out

    status, _, err = finish(cli(run_dir, **{"checkpoint.resume": "auto"}))
    assert status == 0, err[-3000:]
    assert outcome(run_dir)["start_step"] == step
    assert losses(run_dir) == straight


@pytest.mark.slow
def test_term_to_the_process_group_with_data_workers_saves_and_stops_them(cli, tmp_path):
    run_dir = str(tmp_path / "run")
    process = cli(run_dir, **{"schedule.steps": 1000})
    wait_for_steps(run_dir, process, 2)
    os.killpg(process.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
    status, _, err = finish(process)
    assert status == 75, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err
    stopped = outcome(run_dir)
    assert (stopped["outcome"], stopped["signal"]) == ("stopped", "SIGTERM")
    assert stopped["checkpoint"] == os.path.join(run_dir, "checkpoints", f"step_{stopped['step']:08d}")
    # The workers ignored TERM and were stopped by the trainer: nothing of the group is left.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the trainer's group outlived it")


@pytest.mark.slow
def test_usr1_before_the_first_step_exits_cleanly_with_nothing_to_save(cli, tmp_path):
    run_dir = str(tmp_path / "run")
    process = cli(run_dir)
    time.sleep(0.5)  # importing torch, megatron-core and DeepSpeed
    process.send_signal(signal.SIGUSR1)
    status, out, err = finish(process)
    assert status == 75, err[-3000:]
    assert "Traceback" not in err
    assert outcome(run_dir) == {
        "outcome": "stopped",
        "signal": "SIGUSR1",
        "start_step": 0,
        "step": 0,
        "checkpoint": None,
    }
    assert "stopped on SIGUSR1 before the first step; nothing to save" in out
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


@pytest.mark.slow
def test_usr1_to_the_process_group_during_the_extension_build_kills_no_compiler(cli, tmp_path):
    # As scancel and srun do, the signal goes to every process: DeepSpeed's JIT build of its CPU
    # communication op runs ninja and the compiler as the trainer's children, in a fresh extension dir here.
    run_dir, extensions = str(tmp_path / "run"), tmp_path / "extensions"
    process = cli(run_dir, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    deadline = time.monotonic() + 300
    while not list(extensions.glob("*/build.ninja")):
        assert process.poll() is None and time.monotonic() < deadline, finish(process)
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGUSR1)
    status, out, err = finish(process)
    assert status == 75, err[-3000:]
    assert "Traceback" not in err
    assert (outcome(run_dir)["signal"], outcome(run_dir)["step"]) == ("SIGUSR1", 0)
    assert list(extensions.glob("*/*.so")), "the build was not finished"


def stop_inside_worker(rank, world, overrides, during):
    """Request a stop from inside the validation pass or the interval save of step 2."""
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    target = trainer if during == "validation" else trainer.checkpoints
    name = "validate" if during == "validation" else "save"
    original = getattr(target, name)

    def stop_midway(*args, **kwargs):
        trainer.request_stop(signal.SIGUSR1)
        return original(*args, **kwargs)

    setattr(target, name, stop_midway)
    try:
        finished = trainer.fit()
    finally:
        trainer.close()
    manifests = sorted(os.listdir(os.path.join(trainer.checkpoints.root)))
    return finished, [h["step"] for h in history], manifests


@pytest.mark.slow
@pytest.mark.parametrize(
    "during, extra",
    [
        ("validation", {"validation.interval": 2, "validation.batches": 1, "data.valid_fraction": 0.2}),
        ("save", {"checkpoint.interval": 2, "checkpoint.async_save": True, "debug.inject_writer_delay_s": 0.5}),
    ],
)
def test_a_signal_during_validation_or_a_save_stops_at_that_step_boundary(stdlib_shards, tmp_path, during, extra):
    run_dir = str(tmp_path / "run")
    finished, logged, entries = run_distributed(
        stop_inside_worker, 1, train_overrides(stdlib_shards, run_dir, **{"schedule.steps": 6, **extra}), during
    )[0]
    assert not finished
    assert max(logged) == 2  # validation or save finished, then the stop: no step 3
    assert entries == ["latest", "step_00000002"]  # the stop saves step 2 once: as asked, or as the interval save
    reason = json.load(open(os.path.join(run_dir, "checkpoints", "step_00000002", "manifest.json")))["reason"]
    assert reason == ("signal" if during == "validation" else "interval")


BATON_HOLDER = """import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_stale_build_lock_is_named_and_a_held_one_is_not(tmp_path, capfd):
    root = tmp_path / "extensions"
    for op in ("killed_op", "building_op", "fresh_op"):
        (root / op).mkdir(parents=True)
    # torch's FileBaton taken by two processes; one is killed before it could release it.
    killed, building = (
        subprocess.Popen(
            [sys.executable, "-c", BATON_HOLDER, str(root / op / "lock")], stdout=subprocess.PIPE, text=True
        )
        for op in ("killed_op", "building_op")
    )
    try:
        assert killed.stdout.readline() == "held\n" and building.stdout.readline() == "held\n"
        killed.kill()
        killed.wait()
        (root / "fresh_op" / "lock").touch()
        old = time.time() - 3600
        for op in ("killed_op", "building_op"):
            os.utime(root / op / "lock", (old, old))
        assert stale_locks(str(root), min_age_s=60) == [str(root / "killed_op" / "lock")]
        # Young locks are left alone, held or not: a build on another host may hold one.
        assert stale_locks(str(root), min_age_s=7200) == []
        with BuildLockWatch(str(root), interval_s=0.05, min_age_s=60):
            time.sleep(0.5)
        err = capfd.readouterr().err
        assert err.count("warning:") == 1 and f"rm {root / 'killed_op' / 'lock'}" in err
    finally:
        building.kill()
        building.wait()
