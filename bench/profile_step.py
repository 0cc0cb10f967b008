"""Where a training step's GPU time goes: torch.profiler over a few steps of the real trainer.

    python bench/profile_step.py --case infini-1.3b [--warmup 3] [--steps 2] [--out DIR] [key=value ...]

Builds the trainer in-process for one of bench/throughput.py's one-process cases (its run config, e.g.
configs/gpu_1.3b.yaml, with the bench's settings), runs warm-up steps, then profiles the next steps and
prints two tables: GPU time by kernel category (matmul, attention, memory read/write math, optimizer,
copies, communication...) with the share of the step's wall time the GPU sat idle, the top kernels,
and where the idle time falls: the host-side operator that launched the kernel after each gap, and
the host synchronisations that drain the GPU's queue. The chrome trace goes to DIR/trace.json.
Overrides (key=value) go to the run config.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.throughput import CASES, case_run  # noqa: E402
from training.config import load_config  # noqa: E402
from training.train import Trainer  # noqa: E402

# First matching pattern names a kernel's category (kernel names are lower-cased first).
CATEGORIES = [
    ("communication", r"nccl|allreduce|all_reduce|reduce_scatter|allgather"),
    ("attention (SDPA)", r"cudnn|flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|cublas|wgmma|matmul|splitk"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_adamw"),
    ("copy / cast", r"memcpy|memset|copy_|cast|to_copy|convert"),
    ("reduction", r"reduce|sum|cumsum|scan|softmax|norm"),
    ("elementwise (compiled)", r"triton"),
    ("elementwise (eager)", r"elementwise|vectorized|unrolled|pointwise"),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}
# Gaps shorter than this are the launch cadence of back-to-back kernels, not idle time worth naming.
MIN_GAP_US = 20.0


def _enclosing_ops(host_ops: dict, tid, ts: float) -> str:
    """The host operators on thread ``tid`` that enclose time ``ts``, outermost first: the outer two and
    the innermost (where the launch or synchronisation happened)."""
    starts, ends, names = host_ops.get(tid, (np.empty(0), np.empty(0), []))
    inside = np.flatnonzero((starts <= ts) & (ends >= ts))
    chain = [names[i] for i in inside[np.argsort(starts[inside], kind="stable")]]
    chain = list(dict.fromkeys(chain))
    if len(chain) > 3:
        chain = chain[:2] + chain[-1:]
    return " > ".join(chain) if chain else "(no host operator)"


def idle_breakdown(trace_path: str, steps: int, top: int) -> tuple[list, list]:
    """From a chrome trace: the GPU's idle gaps between its first and last work, grouped by the host
    operators that launched the work after each gap; and the host synchronisations (stream, event and
    device synchronise calls, blocking copies) grouped by the operators that made them. Rows are
    (where, count per step, ms per step), largest first."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    work = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("args", {}).get("correlation"))
        for e in events
        if e.get("cat") in GPU_WORK
    )
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    grouped = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            grouped[e["tid"]].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]))
    host_ops = {
        tid: (np.array([o[0] for o in ops]), np.array([o[1] for o in ops]), [o[2] for o in ops])
        for tid, ops in grouped.items()
    }
    gaps = defaultdict(lambda: [0, 0.0])
    busy_until = work[0][1] if work else 0.0
    for start, end, correlation in work[1:]:
        if start - busy_until > MIN_GAP_US:
            launch = launches.get(correlation)
            where = _enclosing_ops(host_ops, launch["tid"], float(launch["ts"])) if launch else "(unknown launch)"
            gaps[where][0] += 1
            gaps[where][1] += start - busy_until
        busy_until = max(busy_until, end)
    syncs = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        name = e.get("name", "")
        if "Synchronize" in name or name == "cudaMemcpy":
            where = _enclosing_ops(host_ops, e["tid"], float(e["ts"]))
            syncs[where][0] += 1
            syncs[where][1] += float(e.get("dur", 0))

    def rows(table):
        ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
        return [(where, count / steps, total / 1e3 / steps) for where, (count, total) in ranked]

    return rows(gaps), rows(syncs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_process = sorted(name for name, (_, processes, _) in CASES.items() if processes == 1)
    parser.add_argument("--case", default="infini-1.3b", choices=one_process)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="runs/profile")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    config, _, overrides = case_run(args.case, f"{args.out}/run", args.warmup + args.steps, args.overrides)
    trainer = Trainer(load_config(config, overrides))
    batches = iter(trainer.train_loader)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step_seconds = 0.0
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            metrics = trainer.train_step(next(batches))
            step_seconds += metrics["step_time_s"]
    # The steps' own time (each ends on a device synchronise), not the profiler's start and stop.
    wall_us = step_seconds * 1e6
    trainer.close()
    prof.export_chrome_trace(os.path.join(args.out, "trace.json"))

    device_events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name != "CPU"]
    by_category = defaultdict(float)
    for event in device_events:
        by_category[category(event.key)] += event.self_device_time_total
    busy = sum(by_category.values())
    print(
        f"\n{args.case}: {args.steps} profiled steps, wall {wall_us / 1e6:.2f} s, last step "
        f"{metrics['tokens_per_s']:,.0f} tokens/s, MFU {100 * (metrics['mfu'] or 0):.1f}%"
    )
    print("\n| category | GPU ms per step | share of wall |")
    print("| --- | ---: | ---: |")
    for label, total in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {total / 1e3 / args.steps:,.1f} | {100 * total / wall_us:.1f}% |")
    print(f"| GPU idle | {(wall_us - busy) / 1e3 / args.steps:,.1f} | {100 * (wall_us - busy) / wall_us:.1f}% |")
    print("\n| top kernels | calls per step | GPU ms per step | category |")
    print("| --- | ---: | ---: | --- |")
    for event in sorted(device_events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(
            f"| {event.key[:90]} | {event.count // args.steps} "
            f"| {event.self_device_time_total / 1e3 / args.steps:,.2f} | "
            f"{category(event.key)} |"
        )
    gaps, syncs = idle_breakdown(os.path.join(args.out, "trace.json"), args.steps, args.top)
    print(
        f"\nIdle gaps of over {MIN_GAP_US:.0f} us between the first and the last GPU work, by the host operators that "
        "launched the work after the gap (outermost > innermost):"
    )
    print("\n| launched by | gaps per step | idle ms per step |\n| --- | ---: | ---: |")
    for where, count, ms in gaps:
        print(f"| {where[:120]} | {count:,.1f} | {ms:,.2f} |")
    print("\nHost synchronisations (the host waits for the GPU, whose queue then runs dry):")
    print("\n| made in | calls per step | host ms waiting per step |\n| --- | ---: | ---: |")
    for where, count, ms in syncs:
        print(f"| {where[:120]} | {count:,.1f} | {ms:,.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
