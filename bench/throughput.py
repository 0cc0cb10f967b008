"""Training throughput of the Infini-attention model, side by side with full-attention baselines.

Each case is a short real training run (``python -m training.train``: data pipeline, megatron-core
schedule, DeepSpeed ZeRO-1 with fp32 master weights, bf16) in its own process; warm-up steps are
excluded. Baselines, when ``--anchor`` names the baseline script (anchor_bench.py), run in the same
call: the compiled plain-PyTorch Llama (fp32 master weights + bf16 autocast) and megatron-core's
local-spec GPT at sequence 2048.

    python bench/throughput.py --cases infini-1.3b,infini-350m --anchor path/to/anchor_bench.py --out DIR
    python bench/throughput.py --cases infini-1.3b --tag lanes16 data.global_lanes=16   (overrides win)
    python bench/throughput.py --cases infini-1.3b,infini-1.3b-tp2pp2 --steps 50 --reference infini-1.3b
        (4 GPUs: tokens/s, and how closely TP2 x PP2 tracks the one-GPU run's loss step by step)
    python bench/throughput.py --cases infini-1.3b-tp2pp2dp2,infini-7b-tp2pp4   (8 GPUs)

MFU is reported two ways: ours (``modeling/flops.py``: matmul parameters, local attention over the
segment, memory read/write) and the anchor's convention (6 x all parameters + 12 L H S, with S the
attended span: the segment for Infini-attention), so the columns compare with the anchor's table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from modeling.config import ModelConfig  # noqa: E402
from modeling.flops import count_parameters  # noqa: E402

PEAK = 989e12

COMMON = [
    "precision=bf16",
    "model.segment_length=2048",
    "data.n_segments=8",
    "data.num_workers=2",
    "parallel.micro_batch_lanes=1",
    "parallel.zero_stage=1",
    "schedule.warmup_steps=2",
    "logging.interval=1",
    "logging.wandb.mode=disabled",
    "checkpoint.save_at_end=false",
    "optimizer.lr=3e-4",
    "build_stdlib_shards=true",
    "data.sources=[{path: runs/data/python-stdlib}]",
]

FAST = ["performance.compile_layers=true", "performance.loss_chunk_tokens=4096"]
CPU = ["precision=fp32", "model.segment_length=64", "data.n_segments=4"]

CASES = {
    # name: (model preset, processes (GPUs), extra overrides)
    "infini-1.3b": ("1.3b", 1, ["data.global_lanes=4", *FAST]),
    "infini-1.3b-eager": ("1.3b", 1, ["data.global_lanes=4", "performance.loss_chunk_tokens=4096"]),
    # Two GPUs: data parallel (twice the lanes, ZeRO-1) and tensor parallel (same lanes).
    "infini-1.3b-dp2": ("1.3b", 2, ["data.global_lanes=8", *FAST]),
    "infini-1.3b-tp2": ("1.3b", 2, ["data.global_lanes=4", "parallel.tensor=2", *FAST]),
    # Four GPUs: the one-GPU run's 4 lanes (so its losses are comparable step by step) as 4 microbatches
    # through two pipeline stages of two tensor-parallel ranks each.
    "infini-1.3b-tp2pp2": ("1.3b", 4, ["data.global_lanes=4", "parallel.tensor=2", "parallel.pipeline=2", *FAST]),
    # Eight GPUs: the same twice over data parallel (ZeRO-1 over the two replicas).
    "infini-1.3b-tp2pp2dp2": ("1.3b", 8, ["data.global_lanes=8", "parallel.tensor=2", "parallel.pipeline=2", *FAST]),
    # 7B: fp32 master weights and Adam state (~16 bytes a parameter) need all 8 cards; windows of two
    # segments keep the activations of the 4 microbatches in flight on the first stage within 80 GB.
    "infini-7b-tp2pp4": (
        "7b",
        8,
        ["data.global_lanes=16", "data.n_segments=2", "parallel.tensor=2", "parallel.pipeline=4", *FAST],
    ),
    "infini-350m": ("350m", 1, ["data.global_lanes=8", *FAST]),
    "infini-125m": ("125m", 1, ["data.global_lanes=8", *FAST]),
    # CPU checks of this script (gloo): one process, and the 4-GPU layout as 4 processes.
    "infini-tiny-cpu": ("tiny", 1, [*CPU, "data.global_lanes=4"]),
    "infini-tiny-cpu-tp2pp2": ("tiny", 4, [*CPU, "data.global_lanes=4", "parallel.tensor=2", "parallel.pipeline=2"]),
}


def run_case(name: str, steps: int, warmup: int, out_dir: str, overrides=(), tag: str = "") -> dict:
    """One training run of CASES[name] (+ overrides, which win); medians over the steps after warmup."""
    preset, nproc, extra = CASES[name]
    label = f"{name}-{tag}" if tag else name
    run_dir = os.path.join(out_dir, label)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "training.train",
        "--config",
        os.path.join(REPO, "configs", "tiny_cpu.yaml"),
        f"defaults.model={preset}",
        f"run_dir={run_dir}",
        f"schedule.steps={steps}",
        *COMMON,
        *extra,
        *overrides,
    ]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    with open(os.path.join(out_dir, f"{label}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {"case": label, "error": f"exit {proc.returncode}: {tail}"}
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in rows if "loss" in r]
    steady = rows[warmup:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    cfg = ModelConfig(**_preset(preset))
    segment = 64 if "-cpu" in name else 2048
    cfg.segment_length = segment
    total, _ = count_parameters(cfg)
    anchor_flops = 6 * total + 12 * cfg.num_layers * cfg.hidden_size * segment
    return {
        "case": label,
        "gpus": nproc,
        "tokens_per_s": tokens_per_s,
        "mfu": statistics.median(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None,
        "mfu_anchor_convention": tokens_per_s * anchor_flops / (PEAK * nproc),
        "peak_memory_gb": max(r.get("gpu_memory_gb", 0.0) for r in rows),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "steps": len(rows),
        "losses": {r["step"]: r["loss"] for r in rows},
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in steady),
        "wall_s": time.time() - started,
    }


def _loss_gap(result: dict, reference) -> str:
    """Largest |loss - reference loss| over the steps both ran, and at which step."""
    if reference is None:
        return "no reference run"
    steps = sorted(set(result["losses"]) & set(reference["losses"]))
    gaps = [(abs(result["losses"][s] - reference["losses"][s]), s) for s in steps]
    worst, step = max(gaps)
    return f"{worst:.4f} (step {step} of {len(steps)})"


def _preset(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "configs", "model", f"{name}.yaml")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="infini-1.3b,infini-350m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--anchor", help="path of the baseline script (anchor_bench.py), to run its baselines here")
    parser.add_argument("--anchor-modes", default="compiled amp megatron")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--tag", default="", help="suffix of the case labels (runs with overrides)")
    parser.add_argument(
        "--reference",
        help="one of --cases (same lanes and data): print each run's largest "
        "per-step loss difference from it, to check that another layout trains the same",
    )
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides for every case")
    args = parser.parse_args(argv)
    if args.reference and args.reference not in args.cases.split(","):
        parser.error(f"--reference {args.reference} is not among --cases {args.cases}")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.cases.split(","):
        result = run_case(name, args.steps, args.warmup, args.out, args.overrides, args.tag)
        results.append(result)
        print(json.dumps({key: value for key, value in result.items() if key != "losses"}), flush=True)
    anchor_lines = []
    if args.anchor:
        proc = subprocess.run([sys.executable, args.anchor, *args.anchor_modes.split()], capture_output=True, text=True)
        anchor_lines = [line for line in proc.stdout.splitlines() if "tok/s" in line or "OOM" in line]
        if proc.returncode != 0:
            anchor_lines.append(f"anchor exit {proc.returncode}: {proc.stderr[-800:]}")
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump({"results": results, "anchor": anchor_lines}, f, indent=1)
    reference_label = f"{args.reference}-{args.tag}" if args.tag else args.reference
    reference = next((r for r in results if r["case"] == reference_label and "error" not in r), None)
    gap_header = f" max per-step loss difference from {args.reference} |" if args.reference else ""
    print(
        f"\n| case | GPUs | tokens/s | MFU (ours) | MFU (anchor convention) | peak GiB | loss first -> last |"
        f"{gap_header}"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.reference else ""))
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | | error | | | | {r['error'][-200:]!r} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        gap = f" {_loss_gap(r, reference)} |" if args.reference else ""
        print(
            f"| {r['case']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{100 * r['mfu_anchor_convention']:.1f}% | {r['peak_memory_gb']:.1f} | "
            f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} |{gap}"
        )
    for line in anchor_lines:
        print("anchor:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
