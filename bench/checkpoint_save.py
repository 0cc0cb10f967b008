"""Checkpoint save time, synchronous and asynchronous (``checkpoint.async_save``), side by side.

Builds the trainer in this process on one device with a model preset (default 1.3b: bf16 weights,
ZeRO-1 with fp32 master weights and Adam state), trains a few steps so that the optimizer state
exists, then saves
- synchronously: training waits until every file is written, flushed and the checkpoint finalized;
- asynchronously, ``--async-saves`` times (the first one also allocates the pinned host memory the
  later ones reuse): training pauses only for the snapshot, then keeps stepping, polling at each step
  boundary as a run does, until the checkpoint is finalized.
For each save: blocking seconds (training paused), write seconds (until every file was flushed),
total seconds (until finalized), GB, GB/s (GB / write seconds), and the step time while the writer
ran against the step time before. ``keep_last=1`` keeps at most two checkpoints on disk; they are
deleted at the end unless ``--keep``.

    python bench/checkpoint_save.py                      # one GPU, the 1.3b preset
    python bench/checkpoint_save.py --preset tiny        # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from modeling.flops import count_parameters  # noqa: E402
from training.checkpoint import SaveReport  # noqa: E402
from training.config import load_config  # noqa: E402
from training.train import Trainer  # noqa: E402


def bench_overrides(args, run_dir: str) -> list:
    gpu = torch.cuda.is_available()
    overrides = [
        f"defaults.model={args.preset}",
        f"run_dir={run_dir}",
        f"checkpoint.dir={os.path.join(run_dir, 'checkpoints')}",
        "data.n_segments=2",
        f"data.global_lanes={args.lanes}",
        "parallel.micro_batch_lanes=1",
        "parallel.zero_stage=1",
        "schedule.steps=100000",
        "schedule.warmup_steps=1",
        "validation.interval=0",
        "logging.interval=1",
        "logging.wandb.mode=disabled",
        "checkpoint.save_at_end=false",
        "checkpoint.keep_last=1",
        "precision=bf16" if gpu else "precision=fp32",
    ]
    if gpu:
        overrides.append("performance.loss_chunk_tokens=4096")
    return overrides


class Bench:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.batches = iter(trainer.train_loader)
        self.finalized: list = []
        # Each finalized save is recorded here and still reported (logged) by the trainer.
        self._report = trainer.checkpoints.on_save
        trainer.checkpoints.on_save = self._record

    def _record(self, report: SaveReport) -> None:
        self.finalized.append(report.metrics())
        self._report(report)

    def step(self) -> float:
        metrics = self.trainer.train_step(next(self.batches))
        self.trainer.log(metrics)
        return metrics["step_time_s"]

    def reports(self) -> list:
        return self.finalized

    def save(self, label: str, asynchronous: bool, max_overlap_steps: int) -> dict:
        """One save; an asynchronous one is polled at step boundaries (as training does) until finalized."""
        finalized = len(self.reports())
        self.trainer.checkpoints.save(self.trainer.state.step, "bench", asynchronous=asynchronous)
        step_times = []
        while len(self.reports()) == finalized:
            if len(step_times) == max_overlap_steps:
                self.trainer.checkpoints.wait()
                break
            step_times.append(self.step())
            self.trainer.checkpoints.poll()
        report = self.reports()[-1]
        return {
            "save": label,
            "blocking_s": report["checkpoint/blocking_seconds"],
            "write_s": report["checkpoint/write_seconds"],
            "total_s": report["checkpoint/seconds"],
            "gb": report["checkpoint/gb"],
            "gb_per_s": report["checkpoint/gb_per_s"],
            "steps_while_writing": len(step_times),
            "step_s_while_writing": statistics.median(step_times) if step_times else None,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1.3b", help="configs/model/<preset>.yaml")
    parser.add_argument("--lanes", type=int, default=2, help="data.global_lanes (2 segments each)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps before timing (optimizer state appears)")
    parser.add_argument("--baseline-steps", type=int, default=3, help="steps timed without a save running")
    parser.add_argument("--async-saves", type=int, default=2)
    parser.add_argument(
        "--max-overlap-steps",
        type=int,
        default=200,
        help="steps to run while an asynchronous save is pending before waiting for it",
    )
    parser.add_argument("--out", default="runs/bench/checkpoint_save")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the config's data path is relative to the repository
    run_dir = os.path.abspath(args.out)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)

    trainer = Trainer(load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), bench_overrides(args, run_dir)))
    bench = Bench(trainer)
    try:
        for _ in range(args.warmup_steps):
            bench.step()
        baseline_step_s = statistics.median(bench.step() for _ in range(args.baseline_steps))
        results = [bench.save("sync", asynchronous=False, max_overlap_steps=args.max_overlap_steps)]
        for index in range(args.async_saves):
            bench.step()  # a later step: its own checkpoint directory
            results.append(
                bench.save(f"async #{index + 1}", asynchronous=True, max_overlap_steps=args.max_overlap_steps)
            )
    finally:
        trainer.close()
    if not args.keep:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    total_parameters, _ = count_parameters(trainer.cfg.model)
    summary = {
        "device": device,
        "preset": args.preset,
        "parameters": total_parameters,
        "precision": "bf16" if trainer.bf16 else "fp32",
        "baseline_step_s": baseline_step_s,
        "saves": results,
    }
    with open(os.path.join(run_dir, "checkpoint_save.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"\n{device}, preset {args.preset} ({total_parameters / 1e6:,.1f}M parameters, {summary['precision']}, "
        f"ZeRO-1, one rank); step time without a save: {baseline_step_s:.3f} s\n"
    )
    print("| save | blocking s | write s | total s | GB | GB/s | steps while writing | step s while writing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        step_s = f"{r['step_s_while_writing']:.3f}" if r["step_s_while_writing"] is not None else "-"
        print(
            f"| {r['save']} | {r['blocking_s']:.2f} | {r['write_s']:.2f} | {r['total_s']:.2f} | {r['gb']:.3f} | "
            f"{r['gb_per_s']:.3f} | {r['steps_while_writing']} | {step_s} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
