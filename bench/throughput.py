"""Training throughput of the Infini-attention model, side by side with full-attention baselines.

Each case is a short real training run (``python -m training.train``: data pipeline, megatron-core
schedule, DeepSpeed ZeRO-1 with fp32 master weights, bf16) in its own process; warm-up steps are
excluded. A case starts from a run config a user would train with (the one-GPU cases from
``configs/gpu_<size>.yaml``, with their speed settings and lanes), so it measures what that config
gets; the bench only turns off checkpoints, validation and W&B and logs every step.

With ``--anchor PATH`` (the baseline script, anchor_bench.py), the baselines run in the same call,
once for each model size among the cases (its ANCHOR_SHAPE: 125m, 350m or 1.3b, the shapes of our
presets), and a last table gives our tokens/s against each baseline's. Its modes
(``--anchor-modes``): ``compiled`` (a compiled plain-PyTorch Llama in bf16 weights), ``amp`` (the
same with fp32 master weights and bf16 autocast, as our trainer runs) and ``megatron``
(megatron-core's local-spec GPT), all at sequence 2048.

    python bench/throughput.py --cases infini-1.3b,infini-350m,infini-125m --anchor path/to/anchor_bench.py
    python bench/throughput.py --cases infini-1.3b --tag f32 performance.half_memory_products=false   (overrides win)
    python bench/throughput.py --cases infini-125m,infini-350m --sweep parallel.micro_batch_lanes=1,2,4
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
import re
import statistics
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from modeling.config import ModelConfig  # noqa: E402
from modeling.flops import count_parameters  # noqa: E402
from training.config import CONFIG_ROOT, ConfigError, TrainConfig, load_config, validate  # noqa: E402
from training.metrics import training_steps  # noqa: E402

PEAK = 989e12

# The bench's own settings on top of each case's run config: every step logged, no checkpoints,
# validation or W&B, a short LR warm-up.
COMMON = [
    "schedule.warmup_steps=2",
    "logging.interval=1",
    "logging.wandb.mode=disabled",
    "validation.interval=0",
    "checkpoint.interval=0",
    "checkpoint.save_at_end=false",
]

CPU = ["data.global_lanes=4", "parallel.micro_batch_lanes=1"]
WINDOW_64K = ["data.n_segments=32", "data.global_lanes=4", "model.recompute=true"]

CASES = {
    # name: (run config under configs/, processes (GPUs), the case's overrides)
    "infini-1.3b": ("gpu_1.3b.yaml", 1, []),
    "infini-1.3b-eager": ("gpu_1.3b.yaml", 1, ["performance.compile_layers=false", "performance.compile_loss=false"]),
    # Two GPUs: data parallel (each rank keeps the one-GPU run's lanes, ZeRO-1) and tensor parallel (same lanes).
    "infini-1.3b-dp2": ("gpu_1.3b.yaml", 2, ["data.global_lanes=64"]),
    "infini-1.3b-tp2": ("gpu_1.3b.yaml", 2, ["parallel.tensor=2"]),
    "infini-1.3b-tp2sp": ("gpu_1.3b.yaml", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    # 64K-token windows (32 segments), whole layers recomputed so that one GPU holds a lane's window: on
    # one GPU, and with the segments split over two (context parallelism, the same lanes).
    "infini-1.3b-64k": ("gpu_1.3b.yaml", 1, [*WINDOW_64K]),
    "infini-1.3b-cp2-64k": ("gpu_1.3b.yaml", 2, [*WINDOW_64K, "parallel.context=2"]),
    # Four GPUs: the one-GPU run's lanes (so its losses are comparable step by step) as one-lane microbatches
    # through two pipeline stages of two tensor-parallel ranks each.
    "infini-1.3b-tp2pp2": ("gpu_1.3b.yaml", 4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    # Eight GPUs: the same twice over data parallel (ZeRO-1 over the two replicas).
    "infini-1.3b-tp2pp2dp2": (
        "gpu_1.3b.yaml",
        8,
        ["data.global_lanes=64", "parallel.tensor=2", "parallel.pipeline=2"],
    ),
    # 7B: fp32 master weights and Adam state (~16 bytes a parameter) need all 8 cards; windows of two
    # segments keep the activations of the microbatches in flight on the first stage within 80 GB.
    "infini-7b-tp2pp4": (
        "layouts/7b_8gpu.yaml",
        8,
        [
            "data.global_lanes=16",
            "data.n_segments=2",
            "parallel.context=1",
            "parallel.zero_stage=1",
            "parallel.tensor=2",
            "parallel.pipeline=4",
        ],
    ),
    "infini-350m": ("gpu_350m.yaml", 1, []),
    "infini-125m": ("gpu_125m.yaml", 1, []),
    # CPU checks of this script (gloo): one process, and the 4-GPU layout as 4 processes.
    "infini-tiny-cpu": ("tiny_cpu.yaml", 1, CPU),
    "infini-tiny-cpu-tp2pp2": ("tiny_cpu.yaml", 4, [*CPU, "parallel.tensor=2", "parallel.pipeline=2"]),
}

# The shapes the baseline script takes as ANCHOR_SHAPE: those of our presets of the same names.
ANCHOR_SHAPES = ("125m", "350m", "1.3b")


def case_run(name: str, run_dir: str, steps: int, overrides=()) -> tuple[str, int, list]:
    """(run config path, processes, key=value overrides) of CASES[name]; the given overrides come last and win."""
    config, nproc, extra = CASES[name]
    args = [f"run_dir={run_dir}", f"schedule.steps={steps}", *COMMON, *extra, *overrides]
    return os.path.join(CONFIG_ROOT, config), nproc, args


def anchor_shape(model: ModelConfig) -> Optional[str]:
    """The ANCHOR_SHAPE whose preset has this model's layers, widths, heads and vocabulary; None if none has."""

    def shape(cfg: ModelConfig) -> tuple:
        return (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.query_groups,
            cfg.ffn_size,
            cfg.vocab_size,
        )

    from omegaconf import OmegaConf

    for name in ANCHOR_SHAPES:
        preset = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_ROOT, "model", f"{name}.yaml")))
        if shape(ModelConfig(**preset)) == shape(model):
            return name
    return None


def run_case(name: str, steps: int, warmup: int, out_dir: str, overrides=(), tag: str = "") -> dict:
    """One training run of CASES[name] (+ overrides, which win); medians over the steps after warmup."""
    label = f"{name}-{tag}" if tag else name
    run_dir = os.path.join(out_dir, label)
    config, nproc, args = case_run(name, run_dir, steps, overrides)
    cfg: TrainConfig = load_config(config, args)
    result = {"case": label, "name": name, "size": anchor_shape(cfg.model), "gpus": nproc}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    )
    started = time.time()
    cmd = [*launcher, "-m", "training.train", "--config", config, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    with open(os.path.join(out_dir, f"{label}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {**result, "error": f"exit {proc.returncode}: {tail}"}
    rows = training_steps(run_dir)
    steady = rows[warmup:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    retries = [r.get("gpu_alloc_retries", 0) for r in rows]
    total, _ = count_parameters(cfg.model)
    anchor_flops = 6 * total + 12 * cfg.model.num_layers * cfg.model.hidden_size * cfg.model.segment_length
    return {
        **result,
        "tokens_per_s": tokens_per_s,
        "mfu": statistics.median(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None,
        "mfu_anchor_convention": tokens_per_s * anchor_flops / (PEAK * nproc),
        "peak_memory_gb": max(r.get("gpu_memory_gb", 0.0) for r in rows),
        "alloc_retries_per_step": (retries[-1] - (retries[warmup - 1] if warmup else 0)) / len(steady),
        "data_wait_ms": 1000 * statistics.median(r["data_wait_s"] for r in steady),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "steps": len(rows),
        "losses": {r["step"]: r["loss"] for r in rows},
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in steady),
        "wall_s": time.time() - started,
    }


# One line of the baseline script's run(): its name padded to 38 columns, then either
# "seq=  2048 mb=8:     57291 tok/s  MFU  53.8%  peak  53.7 GiB  params 1.35B" or "seq=  2048 mb=8: OOM".
ANCHOR_LINE = re.compile(
    r"^(?P<name>.+?)\s+seq=\s*(?P<seq>\d+) mb=(?P<mb>\d+): "
    r"(?:OOM|\s*(?P<tokens_per_s>[\d.]+) tok/s\s+MFU\s+(?P<mfu>[\d.]+)%\s+peak\s+(?P<peak>[\d.]+) GiB"
    r"\s+params (?P<params>[\d.]+)B)\s*$"
)


def parse_anchor(stdout: str) -> list[dict]:
    """The baseline script's result lines: name, seq, mb, tokens_per_s, mfu, peak_gib (None for each after OOM)."""
    baselines = []
    for line in stdout.splitlines():
        match = ANCHOR_LINE.match(line)
        if not match:
            continue
        oom = match["tokens_per_s"] is None
        baselines.append(
            {
                "name": match["name"].strip(),
                "seq": int(match["seq"]),
                "mb": int(match["mb"]),
                "tokens_per_s": None if oom else float(match["tokens_per_s"]),
                "mfu": None if oom else float(match["mfu"]) / 100,
                "peak_gib": None if oom else float(match["peak"]),
            }
        )
    return baselines


def run_anchor(path: str, shape: str, modes: list, microbatch: Optional[int] = None) -> dict:
    """The baseline script at ANCHOR_SHAPE=shape (ANCHOR_MB=microbatch if given): its parsed result lines."""
    env = {**os.environ, "ANCHOR_SHAPE": shape}
    if microbatch is not None:
        env["ANCHOR_MB"] = str(microbatch)
    proc = subprocess.run([sys.executable, path, *modes], capture_output=True, text=True, env=env)
    anchor = {"shape": shape, "baselines": parse_anchor(proc.stdout), "output": proc.stdout}
    if proc.returncode != 0:
        anchor["error"] = f"exit {proc.returncode}: {proc.stderr[-800:]}"
    return anchor


def baseline_table(results: list, anchors: dict) -> list[str]:
    """Markdown rows: each case of a size the baseline ran, against each of that size's baseline lines."""
    lines = [
        "| size | case | tokens/s | MFU (ours) | baseline | baseline tokens/s | baseline MFU (anchor's) | ratio |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        anchor = anchors.get(r["size"])
        if anchor is None:
            continue
        ours = "error" if "error" in r else f"{r['tokens_per_s']:,.0f}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        head = f"| {r['size']} | {r['case']} | {ours} | {mfu} |"
        if not anchor["baselines"]:
            lines.append(f"{head} {anchor.get('error', 'no result lines')[-200:]!r} | | | |")
        for b in anchor["baselines"]:
            name = f"{b['name']}, seq {b['seq']}, mb {b['mb']}"
            if b["tokens_per_s"] is None:
                lines.append(f"{head} {name} | out of memory | | |")
                continue
            ratio = f" {r['tokens_per_s'] / b['tokens_per_s']:.2f} " if "error" not in r else " "
            lines.append(f"{head} {name} | {b['tokens_per_s']:,.0f} | {100 * b['mfu']:.1f}% |{ratio}|")
    return lines


def _loss_gap(result: dict, reference) -> str:
    """Largest |loss - reference loss| over the steps both ran, and at which step."""
    if reference is None:
        return "no reference run"
    steps = sorted(set(result["losses"]) & set(reference["losses"]))
    gaps = [(abs(result["losses"][s] - reference["losses"][s]), s) for s in steps]
    worst, step = max(gaps)
    return f"{worst:.4f} (step {step} of {len(steps)})"


def sweep_runs(cases: list, tag: str, sweep: Optional[str]) -> list[tuple[str, list, str]]:
    """(case, extra overrides, tag) of every run: each case once, or once per value of --sweep KEY=V1,V2,..."""
    if not sweep:
        return [(name, [], tag) for name in cases]
    key, _, values = sweep.partition("=")
    short = key.rsplit(".", 1)[-1]
    return [
        (name, [f"{key}={value}"], "-".join(part for part in (tag, f"{short}{value}") if part))
        for name in cases
        for value in values.split(",")
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="infini-1.3b,infini-350m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--anchor", help="path of the baseline script (anchor_bench.py): run it for each model size among the cases"
    )
    parser.add_argument("--anchor-modes", default="compiled amp megatron")
    parser.add_argument("--anchor-mb", type=int, help="ANCHOR_MB: the microbatch of the baseline's plain runs")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--tag", default="", help="suffix of the case labels (runs with overrides)")
    parser.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="run each case once per value of this key, e.g. parallel.micro_batch_lanes=1,2,4",
    )
    parser.add_argument(
        "--reference",
        help="one of --cases (same lanes and data): print each run's largest "
        "per-step loss difference from it, to check that another layout trains the same",
    )
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides for every case")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [name for name in cases if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.reference and args.reference not in cases:
        parser.error(f"--reference {args.reference} is not among --cases {args.cases}")
    if args.anchor and not os.path.isfile(args.anchor):
        parser.error(f"--anchor {args.anchor}: no such file")
    if args.sweep and "=" not in args.sweep:
        parser.error(f"--sweep {args.sweep}: expected KEY=V1,V2,...")
    runs = sweep_runs(cases, args.tag, args.sweep)
    for name, extra, tag in runs:  # every run's config and layout, before any GPU time is spent
        config, nproc, overrides = case_run(name, args.out, args.steps, [*args.overrides, *extra])
        try:
            validate(load_config(config, overrides), world_size=nproc)
        except ConfigError as error:
            parser.error(f"{name}{f' ({tag})' if tag else ''}: {error}")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name, extra, tag in runs:
        result = run_case(name, args.steps, args.warmup, args.out, [*args.overrides, *extra], tag)
        results.append(result)
        print(json.dumps({key: value for key, value in result.items() if key != "losses"}), flush=True)
    anchors = {}
    if args.anchor:
        for size in dict.fromkeys(r["size"] for r in results if r["size"] is not None):
            anchors[size] = run_anchor(args.anchor, size, args.anchor_modes.split(), args.anchor_mb)
            print(json.dumps({key: value for key, value in anchors[size].items() if key != "output"}), flush=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump({"results": results, "anchor": anchors}, f, indent=1)
    reference = next((r for r in results if r["name"] == args.reference and "error" not in r), None)
    gap_header = f" max per-step loss difference from {args.reference} |" if args.reference else ""
    print(
        "\n| case | GPUs | tokens/s | MFU (ours) | MFU (anchor convention) | peak GiB | allocator retries a step "
        f"| data wait ms a step | loss first -> last |{gap_header}"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.reference else ""))
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | | error | | | | | | {r['error'][-200:]!r} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        gap = f" {_loss_gap(r, reference)} |" if args.reference else ""
        print(
            f"| {r['case']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{100 * r['mfu_anchor_convention']:.1f}% | {r['peak_memory_gb']:.1f} | {r['alloc_retries_per_step']:g} | "
            f"{r['data_wait_ms']:.1f} | "
            f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} |{gap}"
        )
    if anchors:
        print("\nAgainst the baseline script, same model shape:\n")
        print("\n".join(baseline_table(results, anchors)))
    without = [r["case"] for r in results if r["size"] is None]
    if args.anchor and without:
        print(f"\nNo baseline has the model shape of {', '.join(without)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
