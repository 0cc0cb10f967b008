"""Where a training step's GPU time goes: torch.profiler over a few steps of the real trainer.

    python bench/profile_step.py --case infini-1.3b [--warmup 3] [--steps 2] [--out DIR] [--anchor PATH]
        [--python-stack] [key=value ...]

Builds the trainer in-process for one of bench/throughput.py's one-process cases (its run config, e.g.
configs/gpu_1.3b.yaml, with the bench's settings), runs warm-up steps, then profiles the next steps and
prints tables: GPU time by kernel category (matmul, attention, memory read/write math, optimizer,
copies, communication...) with the share of the step's wall time the GPU sat idle, the top kernels, the
matrix products by input shape with their rates (compiled graphs' included), Python's garbage
collections, and where the idle time falls: the host-side operator that launched the kernel after each
gap, the largest gaps with what the host was in meanwhile, and the host synchronisations that drain the
GPU's queue (by CUDA call and operator; with --python-stack, one outside every operator by the Python
functions around it). The chrome trace goes to DIR/trace.json.
Overrides (key=value) go to the run config. With --anchor (the baseline script's path), the baseline at
the case's shape is profiled first (bench/profile_anchor.py, its own process), and a last table puts
both side by side in GPU time per 1,000 tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.throughput import CASES, anchor_shape, case_run  # noqa: E402
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


def gpu_work(prof) -> list:
    """The kernels, copies and memsets of a finished torch.profiler run, averaged by name; not the ranges
    that span them on the GPU's timeline (with record_shapes, one around each compiled graph's call)."""
    return [
        event
        for event in prof.key_averages()
        if event.device_time_total > 0 and event.device_type.name != "CPU" and not event.is_user_annotation
    ]


def time_by_category(work: list, steps: int) -> dict:
    """GPU ms per step by kernel category, from ``gpu_work`` of a profiler run over ``steps`` steps."""
    by_category = defaultdict(float)
    for event in work:
        by_category[category(event.key)] += event.self_device_time_total / 1e3 / steps
    return dict(by_category)


def category_table(by_category: dict, wall_ms: float) -> list[str]:
    """Markdown rows: GPU ms per step by category, largest first, with each one's share of the step's wall
    time, and the rest of the wall time as the GPU's idle."""
    rows = ["| category | GPU ms per step | share of wall |", "| --- | ---: | ---: |"]
    for label, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {label} | {ms:,.1f} | {100 * ms / wall_ms:.1f}% |")
    idle_ms = wall_ms - sum(by_category.values())
    rows.append(f"| GPU idle | {idle_ms:,.1f} | {100 * idle_ms / wall_ms:.1f}% |")
    return rows


# FLOPs of one call from its operands' shapes; the leaf operators only (aten::matmul and aten::linear call
# them). Compiled graphs call them with an output tensor, whose shape comes after the operands'.
MATMUL_FLOPS = {
    "aten::mm": lambda a, b: 2 * a[0] * a[1] * b[1],
    "aten::addmm": lambda bias, a, b: 2 * a[0] * a[1] * b[1],
    "aten::bmm": lambda a, b: 2 * a[0] * a[1] * a[2] * b[2],
    "aten::baddbmm": lambda c, a, b: 2 * a[0] * a[1] * a[2] * b[2],
}


def matmul_shapes(prof, steps: int, top: int) -> list[tuple]:
    """(operator, input shapes, calls per step, ms per step, TFLOP/s) for the matrix products of a
    torch.profiler run with record_shapes, most time first (GPU time, or the host's without a GPU): which
    products run below the card's rate."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        flops = MATMUL_FLOPS.get(event.key)
        if flops is None:
            continue
        operands = flops.__code__.co_argcount
        shapes = [list(shape) for shape in event.input_shapes or [] if shape][:operands]
        # On the CPU the operator's own time is the product's.
        us = event.device_time_total if event.device_time_total > 0 else event.cpu_time_total
        if us <= 0 or len(shapes) != operands:
            continue
        ms = us / 1e3 / steps
        calls = event.count / steps
        rows.append(
            (event.key, " x ".join(str(shape) for shape in shapes), calls, ms, calls * flops(*shapes) / ms / 1e9)
        )
    return sorted(rows, key=lambda row: -row[3])[:top]


def matmul_table(rows: list[tuple]) -> list[str]:
    out = [
        "| operator | input shapes | calls per step | ms per step | TFLOP/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    return out + [
        f"| {op} | {shapes} | {calls:,.1f} | {ms:,.2f} | {tflops:,.1f} |" for op, shapes, calls, ms, tflops in rows
    ]


@contextmanager
def python_gc_recorded():
    """Puts each Python garbage collection into the profiler's trace as a host range ("python gc,
    generation N") and counts them: {generation: [collections, seconds]}. A long collection holds the
    host while the GPU's queue runs dry."""
    totals = defaultdict(lambda: [0, 0.0])
    running = []

    def callback(phase, info):
        if phase == "start":
            span = record_function(f"python gc, generation {info['generation']}")
            span.__enter__()
            running.append((span, time.perf_counter(), info["generation"]))
        elif running:
            span, started, generation = running.pop()
            span.__exit__(None, None, None)
            totals[generation][0] += 1
            totals[generation][1] += time.perf_counter() - started

    gc.callbacks.append(callback)
    try:
        yield totals
    finally:
        gc.callbacks.remove(callback)


def profile_baseline(anchor: str, shape: str, warmup: int, steps: int, out_dir: str) -> dict:
    """bench/profile_anchor.py's result for the baseline script at ``shape``, run in its own process so
    that its GPU memory is free again before the trainer starts."""
    result_path = os.path.join(out_dir, f"anchor-{shape}.json")
    command = [sys.executable, os.path.join(REPO, "bench", "profile_anchor.py"), "--anchor", anchor]
    command += ["--shape", shape, "--warmup", str(warmup), "--steps", str(steps), "--json", result_path]
    subprocess.run(command, check=True)
    with open(result_path) as f:
        return json.load(f)


def side_by_side(ours: dict, ours_tokens: float, ours_wall_ms: float, baseline: dict) -> list[str]:
    """Markdown rows: GPU us per 1,000 tokens by category for ours and the baseline and the difference, then
    the GPU's busy total, its idle time and the step's wall time on the same scale."""
    rows = ["| category | ours, us per 1K tokens | baseline | ours - baseline |", "| --- | ---: | ---: | ---: |"]
    per_k_ours = {label: 1e6 * ms / ours_tokens for label, ms in ours.items()}
    per_k_base = {label: 1e6 * ms / baseline["tokens"] for label, ms in baseline["categories"].items()}
    wall_ours, wall_base = 1e6 * ours_wall_ms / ours_tokens, 1e6 * baseline["wall_ms"] / baseline["tokens"]
    busy_ours, busy_base = sum(per_k_ours.values()), sum(per_k_base.values())
    labels = sorted(set(per_k_ours) | set(per_k_base), key=lambda label: -per_k_ours.get(label, 0.0))
    pairs = [(label, per_k_ours.get(label, 0.0), per_k_base.get(label, 0.0)) for label in labels]
    pairs += [
        ("GPU busy", busy_ours, busy_base),
        ("GPU idle", wall_ours - busy_ours, wall_base - busy_base),
        ("step (wall)", wall_ours, wall_base),
    ]
    rows += [f"| {label} | {a:,.1f} | {b:,.1f} | {a - b:+,.1f} |" for label, a, b in pairs]
    return rows


GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}
# Gaps shorter than this are the launch cadence of back-to-back kernels, not idle time worth naming.
MIN_GAP_US = 20.0


NO_HOST_OPERATOR = "(no host operator)"


def _spans_by_thread(events: list, categories: tuple) -> dict:
    """Per thread, the (starts, ends, names) of the trace's complete events of those categories."""
    grouped = defaultdict(list)
    for e in events:
        if e.get("cat") in categories:
            grouped[e["tid"]].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]))
    return {
        tid: (np.array([s[0] for s in spans]), np.array([s[1] for s in spans]), [s[2] for s in spans])
        for tid, spans in grouped.items()
    }


def _enclosing(spans: dict, tid, ts: float) -> list:
    """The names of the spans on thread ``tid`` that enclose time ``ts``, outermost first, each once."""
    starts, ends, names = spans.get(tid, (np.empty(0), np.empty(0), []))
    inside = np.flatnonzero((starts <= ts) & (ends >= ts))
    return list(dict.fromkeys(names[i] for i in inside[np.argsort(starts[inside], kind="stable")]))


def _enclosing_ops(host_ops: dict, tid, ts: float) -> str:
    """The host operators on thread ``tid`` that enclose time ``ts``, outermost first: the outer two and
    the innermost (where the launch or synchronisation happened)."""
    chain = _enclosing(host_ops, tid, ts)
    if len(chain) > 3:
        chain = chain[:2] + chain[-1:]
    return " > ".join(chain) if chain else NO_HOST_OPERATOR


def _innermost(spans: dict, tid, ts: float, count: int) -> str:
    """The innermost ``count`` spans on thread ``tid`` around time ``ts``, outermost first."""
    return " > ".join(_enclosing(spans, tid, ts)[-count:]) or "(none)"


def idle_breakdown(trace_path: str, steps: int, top: int) -> tuple[list, list, list]:
    """From a chrome trace: the GPU's idle gaps between its first and last work, grouped by the host
    operators that launched the work after each gap; the host synchronisations (stream, event and
    device synchronise calls, blocking copies) grouped by the operators that made them, both as rows
    (where, count per step, ms per step), largest first; and the largest single gaps as (ms, the host
    operators at the gap's middle on the launching thread, the launching operators)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    work = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("args", {}).get("correlation"))
        for e in events
        if e.get("cat") in GPU_WORK
    )
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    host_ops = _spans_by_thread(events, ("cpu_op", "user_annotation"))
    gaps = defaultdict(lambda: [0, 0.0])
    largest = []
    busy_until = work[0][1] if work else 0.0
    for start, end, correlation in work[1:]:
        gap = start - busy_until
        if gap > MIN_GAP_US:
            launch = launches.get(correlation)
            where = _enclosing_ops(host_ops, launch["tid"], float(launch["ts"])) if launch else "(unknown launch)"
            gaps[where][0] += 1
            gaps[where][1] += gap
            during = _enclosing_ops(host_ops, launch["tid"], busy_until + gap / 2) if launch else "(unknown)"
            largest.append((gap / 1e3, during, where))
        busy_until = max(busy_until, end)
    python_frames = _spans_by_thread(events, ("python_function",))
    syncs = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        name = e.get("name", "")
        if "Synchronize" in name or name == "cudaMemcpy":
            where = _enclosing_ops(host_ops, e["tid"], float(e["ts"]))
            if where == NO_HOST_OPERATOR and e["tid"] in python_frames:
                # Outside every operator: the Python functions around the call (--python-stack) say where.
                where = "(python) " + _innermost(python_frames, e["tid"], float(e["ts"]), 2)
            key = f"{name}: {where}"
            syncs[key][0] += 1
            syncs[key][1] += float(e.get("dur", 0))

    def rows(table):
        ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
        return [(where, count / steps, total / 1e3 / steps) for where, (count, total) in ranked]

    return rows(gaps), rows(syncs), sorted(largest, key=lambda gap: -gap[0])[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_process = sorted(name for name, (_, processes, _) in CASES.items() if processes == 1)
    parser.add_argument("--case", default="infini-1.3b", choices=one_process)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="runs/profile")
    parser.add_argument("--anchor", help="the baseline script's path: profile it too, at the case's shape")
    parser.add_argument(
        "--python-stack",
        action="store_true",
        help="record Python frames (slower host): a synchronisation outside every operator is named by them",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    config, _, overrides = case_run(args.case, f"{args.out}/run", args.warmup + args.steps, args.overrides)
    cfg = load_config(config, overrides)
    baseline = None
    if args.anchor:
        shape = anchor_shape(cfg.model)
        if shape is None:
            raise SystemExit(f"--anchor: the baseline script has no shape like --case {args.case}'s model")
        baseline = profile_baseline(args.anchor, shape, args.warmup, args.steps, args.out)
    trainer = Trainer(cfg)
    batches = iter(trainer.train_loader)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step_seconds = 0.0
    step_tokens = cfg.data.global_lanes * trainer.window
    with (
        profile(activities=activities, record_shapes=True, with_stack=args.python_stack) as prof,
        python_gc_recorded() as collections,
    ):
        for _ in range(args.steps):
            metrics = trainer.train_step(next(batches))
            step_seconds += metrics["step_time_s"]
    # The steps' own time (each ends on a device synchronise), not the profiler's start and stop.
    wall_us = step_seconds * 1e6
    trainer.close()
    prof.export_chrome_trace(os.path.join(args.out, "trace.json"))

    device_events = gpu_work(prof)
    by_category = time_by_category(device_events, args.steps)
    wall_ms = wall_us / 1e3 / args.steps
    print(
        f"\n{args.case}: {args.steps} profiled steps, wall {wall_us / 1e6:.2f} s, last step "
        f"{metrics['tokens_per_s']:,.0f} tokens/s, MFU {100 * (metrics['mfu'] or 0):.1f}%"
    )
    print("\n" + "\n".join(category_table(by_category, wall_ms)))
    print("\n| top kernels | calls per step | GPU ms per step | category |")
    print("| --- | ---: | ---: | --- |")
    for event in sorted(device_events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(
            f"| {event.key[:90]} | {event.count // args.steps} "
            f"| {event.self_device_time_total / 1e3 / args.steps:,.2f} | "
            f"{category(event.key)} |"
        )
    print("\nMatrix products by input shape:\n")
    print("\n".join(matmul_table(matmul_shapes(prof, args.steps, args.top))))
    print("\nPython garbage collections during the profiled steps:\n")
    print("| generation | collections per step | host ms per step |\n| ---: | ---: | ---: |")
    for generation, (count, seconds) in sorted(collections.items()):
        print(f"| {generation} | {count / args.steps:,.1f} | {1e3 * seconds / args.steps:,.2f} |")
    gaps, syncs, largest = idle_breakdown(os.path.join(args.out, "trace.json"), args.steps, args.top)
    print(
        f"\nIdle gaps of over {MIN_GAP_US:.0f} us between the first and the last GPU work, by the host operators that "
        "launched the work after the gap (outermost > innermost):"
    )
    print("\n| launched by | gaps per step | idle ms per step |\n| --- | ---: | ---: |")
    for where, count, ms in gaps:
        print(f"| {where[:120]} | {count:,.1f} | {ms:,.2f} |")
    print("\nThe largest gaps, with what the host was in at each gap's middle:")
    print("\n| idle ms | host in | launched by |\n| ---: | --- | --- |")
    for ms, during, where in largest[:10]:
        print(f"| {ms:,.2f} | {during[:100]} | {where[:100]} |")
    print("\nHost synchronisations (the host waits for the GPU, whose queue then runs dry):")
    print("\n| call: made in | calls per step | host ms waiting per step |\n| --- | ---: | ---: |")
    for where, count, ms in syncs:
        print(f"| {where[:120]} | {count:,.1f} | {ms:,.2f} |")
    if baseline is not None:
        print(f"\nBeside the baseline ({baseline['tokens']:,} tokens a step; ours {step_tokens:,.0f}):\n")
        print("\n".join(side_by_side(by_category, step_tokens, wall_ms, baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
