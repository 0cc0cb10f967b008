"""Launch training on SLURM: ``python -m launch.slurm submit|status|cancel|logs``.

``submit`` renders ``launch/sbatch.sh.tmpl`` for a run, writes it to ``<run_dir>/sbatch.sh`` and
submits it; ``--dry-run`` prints it instead. The job runs one srun task per GPU (one per node with
``--gpus-per-node 0``) and asks for USR1 before its time limit. On USR1 (to the batch shell or to the
ranks) the ranks save their last finished step and the job requeues itself to resume from it; on TERM
(scancel, the time limit) they save it and the job ends. The trainer's ``<run_dir>/outcome.json`` tells
the script which happened; a crash fails the job, and so do more than ``--max-requeues-without-progress``
starts in a row stopped before their first step.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbatch.sh.tmpl")
# The directory holding the training package: the checkout, or site-packages when installed.
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPU_ENV_DEFAULTS = {
    # megatron-core's overlap of tensor-parallel communication with compute needs in-order launches.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "NCCL_DEBUG": "WARN",
    # Fewer out-of-memory failures from fragmentation over long runs.
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "OMP_NUM_THREADS": "${SLURM_CPUS_PER_TASK:-4}",
}
CPU_ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "${SLURM_CPUS_PER_TASK:-1}",
}


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    qos: Optional[str] = None
    signal_seconds: int = 300
    job_name: str = "infinitron"


def sbatch_directives(layout: Layout, run_dir: str) -> List[str]:
    lines = [f"--job-name={layout.job_name}", f"--nodes={layout.nodes}", f"--ntasks-per-node={layout.tasks_per_node}"]
    if layout.gpus_per_node:
        lines.append(f"--gpus-per-node={layout.gpus_per_node}")
    optional = [
        ("cpus-per-task", layout.cpus_per_task),
        ("partition", layout.partition),
        ("account", layout.account),
        ("time", layout.time),
        ("qos", layout.qos),
    ]
    lines += [f"--{name}={value}" for name, value in optional if value is not None]
    lines += [
        f"--signal=B:USR1@{layout.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={os.path.join(run_dir, 'slurm-%j.out')}",
    ]
    return [f"#SBATCH {line}" for line in lines]


def render(template: str, values: Dict[str, str]) -> str:
    """Replace every ``{{name}}``; a placeholder without a value is an error, not an empty string."""
    missing = sorted(set(re.findall(r"{{(\w+)}}", template)) - set(values))
    if missing:
        raise KeyError(f"{TEMPLATE}: no value for {missing}")
    return re.sub(r"{{(\w+)}}", lambda match: values[match.group(1)], template)


def split_overrides(overrides: Sequence[str]):
    """The user's overrides less run_dir (passed resolved), checkpoint.resume and checkpoint.start_over; and the
    override of the first start: checkpoint.resume as given (default auto), or checkpoint.start_over=true when
    given. A requeued start always resumes (auto): starting over again would remove the job's own checkpoints."""
    rest, first = [], "checkpoint.resume=auto"
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "checkpoint.resume" or (key == "checkpoint.start_over" and value.strip().lower() == "true"):
            first = f"{key}={value}"
        elif key not in ("run_dir", "checkpoint.start_over"):
            rest.append(item)
    return rest, first


def render_script(
    config: str,
    overrides: Sequence[str],
    run_dir: str,
    layout: Layout,
    workdir: str,
    max_requeues_without_progress: int = 3,
) -> str:
    user_overrides, first_start = split_overrides(overrides)
    env = GPU_ENV_DEFAULTS if layout.gpus_per_node else CPU_ENV_DEFAULTS
    srun = [f"--nodes={layout.nodes}", f"--ntasks-per-node={layout.tasks_per_node}", "--kill-on-bad-exit=1"]
    with open(TEMPLATE) as f:
        template = f.read()
    return render(
        template,
        {
            "directives": "\n".join(sbatch_directives(layout, run_dir)),
            "workdir": shlex.quote(workdir),
            "run_dir": shlex.quote(run_dir),
            "max_requeues_without_progress": str(max_requeues_without_progress),
            "code_root": shlex.quote(CODE_ROOT),
            "env_defaults": "\n".join(f'export {name}="${{{name}:-{value}}}"' for name, value in env.items()),
            "first_start": shlex.quote(first_start),
            "srun_options": " ".join(srun),
            "python": shlex.quote(sys.executable),
            "config": shlex.quote(config),
            "overrides": " ".join(shlex.quote(item) for item in [*user_overrides, f"run_dir={run_dir}"]),
        },
    )


def resolve_run(config: str, overrides: Sequence[str], world_size: int) -> str:
    """Load and check the config as the trainer will (so errors show now, not after queueing); its run_dir."""
    # Imported here: training.config pulls in megatron-core (seconds), which status/cancel/logs do not need.
    from training.config import load_config, validate

    cfg = load_config(config, overrides)
    validate(cfg, world_size)
    return os.path.abspath(cfg.run_dir)


def scontrol_job(job_id: str) -> Dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"scontrol show job {job_id}: {out.stderr.strip() or out.stdout.strip()}")
    fields = {}
    for token in out.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def cmd_submit(args) -> int:
    from training.config import ConfigError

    if args.gpus_per_node < 0 or args.nodes < 1 or args.max_requeues_without_progress < 0:
        raise SystemExit("--nodes must be >= 1, --gpus-per-node and --max-requeues-without-progress >= 0")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise SystemExit("one task per GPU: --tasks-per-node is for --gpus-per-node 0")
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    try:
        run_dir = resolve_run(args.config, args.overrides, args.nodes * tasks)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    layout = Layout(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time=args.time,
        qos=args.qos,
        signal_seconds=args.signal_seconds,
        job_name=args.job_name or os.path.basename(run_dir),
    )
    script = render_script(
        os.path.abspath(args.config), args.overrides, run_dir, layout, os.getcwd(), args.max_requeues_without_progress
    )
    if args.dry_run:
        print(script, end="")
        return 0
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "sbatch.sh")
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted {path}; log: {os.path.join(run_dir, f'slurm-{job_id}.out')}", file=sys.stderr)
    print(job_id)
    return 0


def cmd_status(args) -> int:
    job = scontrol_job(args.job_id)
    for key in (
        "JobId",
        "JobName",
        "JobState",
        "Reason",
        "Restarts",
        "ExitCode",
        "RunTime",
        "TimeLimit",
        "NodeList",
        "StdOut",
    ):
        print(f"{key}={job.get(key, '')}")
    return 0


def cmd_cancel(args) -> int:
    # USR1 to the batch shell is what the time limit sends: checkpoint, then requeue.
    command = ["scancel", "--signal=USR1", "--batch", args.job_id] if args.requeue else ["scancel", args.job_id]
    return subprocess.run(command).returncode


def cmd_logs(args) -> int:
    path = scontrol_job(args.job_id).get("StdOut", "")
    if not os.path.exists(path):
        raise SystemExit(f"job {args.job_id}: no log at {path!r} yet")
    with open(path, errors="replace") as f:
        lines = f.readlines()
    sys.stdout.writelines(lines[-args.lines :] if args.lines else lines)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="render the sbatch script, write it to the run dir, submit it")
    submit.add_argument("--config", required=True, help="run YAML, as for training.train")
    submit.add_argument("--nodes", type=int, required=True)
    submit.add_argument(
        "--gpus-per-node",
        type=int,
        required=True,
        help="one task per GPU; 0 for CPU-only clusters (gloo), see --tasks-per-node",
    )
    submit.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node with --gpus-per-node 0 (1)")
    submit.add_argument("--cpus-per-task", type=int, default=None)
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--time", help="time limit, e.g. 24:00:00")
    submit.add_argument("--qos")
    submit.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="USR1 this many seconds before the time limit (SLURM may send it up to 60 s early)",
    )
    submit.add_argument("--job-name", help="default: the run directory's name")
    submit.add_argument(
        "--max-requeues-without-progress",
        type=int,
        default=3,
        help="requeue at most this many starts in a row that USR1 stopped before their first step",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    submit.add_argument("overrides", nargs="*", help="key=value config overrides, as for training.train")
    submit.set_defaults(fn=cmd_submit)

    status = commands.add_parser("status", help="state, restarts, exit code, nodes and log of a job")
    status.add_argument("job_id")
    status.set_defaults(fn=cmd_status)

    cancel = commands.add_parser(
        "cancel", help="cancel a job; its ranks save their last finished step if SLURM's KillWait allows"
    )
    cancel.add_argument("job_id")
    cancel.add_argument("--requeue", action="store_true", help="checkpoint and requeue instead (like a preemption)")
    cancel.set_defaults(fn=cmd_cancel)

    logs = commands.add_parser("logs", help="print a job's output (rank 0's console and SLURM's messages)")
    logs.add_argument("job_id")
    logs.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    logs.set_defaults(fn=cmd_logs)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
