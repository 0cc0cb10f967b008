"""The equal-compute long-context comparison: its runs, their FLOPs, the report and the plot.

    python -m evals.long_context runs [--runs FILE]
    python -m evals.long_context seeds "1234 2 3"
    python -m evals.long_context overrides RUN [--runs FILE]
    python -m evals.long_context flops [--config FILE] [--runs FILE] [key=value ...]
    python -m evals.long_context report OUT [--runs FILE] [--seeds "1234 2 3"]
    python -m evals.long_context plot OUT/comparison.json [--out PNG]

The runs file (default configs/experiments/long_context_runs.yaml) names each run, its label and its
``key=value`` overrides of the shared base config (configs/experiments/long_context.yaml). ``runs``
prints the run names, ``seeds`` checks a list of seeds, ``overrides`` a run's overrides for the
trainer's command line; ``flops`` prints each run's parameters, training FLOPs per token
(modeling/flops.py), tokens and their spread, from the configs alone; ``report`` reads what
configs/experiments/long_context_run.sh wrote under OUT (each run's resolved config, metrics.jsonl and
perplexity.json) and writes OUT/comparison.json and OUT/comparison.md; ``plot`` draws perplexity by
position bucket from comparison.json (matplotlib, a separate step so that the runs need no plotting
library).

With ``--seeds``, every run was trained once a seed, in OUT/seed-<seed>/<run>: the report gives each
bucket's perplexity over the seeds as exp of the mean loss, with the lowest and highest seed's beside it,
since at small budgets the initial weights alone can move a run by more than the runs differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from training.metrics import training_steps

BASE_CONFIG = "configs/experiments/long_context.yaml"
RUNS_FILE = "configs/experiments/long_context_runs.yaml"
FLOPS_TOLERANCE = 0.05
"""The runs' training FLOPs per token may differ by at most this fraction (largest over smallest)."""
LOSS_TAIL_STEPS = 20
"""The reported training loss is the mean over this many last steps."""


def load_runs(path: str = RUNS_FILE) -> Dict[str, dict]:
    """Run name -> {"label", "overrides"}, in file order; ValueError naming what is wrong."""
    runs = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"{path}: expected a mapping of run names to {{label, overrides}}")
    for name, run in runs.items():
        if not isinstance(run, dict) or set(run) != {"label", "overrides"} or not isinstance(run["overrides"], list):
            raise ValueError(f"{path}: run {name!r} must have exactly a label and a list of overrides")
    return runs


def run_configs(config: str = BASE_CONFIG, runs_file: str = RUNS_FILE, extra: Sequence[str] = ()) -> dict:
    """Run name -> its TrainConfig: the base config, then ``extra``, then the run's overrides."""
    from training.config import load_config

    return {name: load_config(config, [*extra, *run["overrides"]]) for name, run in load_runs(runs_file).items()}


def tokens_per_step(cfg) -> int:
    return cfg.data.global_lanes * cfg.data.n_segments * cfg.model.segment_length


def cost_row(name: str, label: str, cfg) -> dict:
    """What a run costs, from its config: parameters, FLOPs per token and over the run, tokens."""
    from modeling.flops import model_cost

    cost = model_cost(cfg.model, cfg.parallel.tensor)
    tokens = cfg.schedule.steps * tokens_per_step(cfg)
    return dict(
        run=name,
        label=label,
        seed=cfg.seed,
        memory=cfg.model.memory,
        segment_length=cfg.model.segment_length,
        parameters=cost.parameters,
        flops_per_token=cost.flops_per_token,
        steps=cfg.schedule.steps,
        tokens_per_step=tokens_per_step(cfg),
        tokens=tokens,
        train_flops=cost.flops_per_token * tokens,
    )


def spread(rows: List[dict]) -> float:
    """Largest over smallest FLOPs per token, minus 1."""
    flops = [row["flops_per_token"] for row in rows]
    return max(flops) / min(flops) - 1.0


def context_text(row: dict) -> str:
    if row["memory"]:
        return f"{row['segment_length']:,} + memory"
    return f"{row['segment_length']:,}"


def cost_table(rows: List[dict]) -> str:
    smallest = min(row["flops_per_token"] for row in rows)
    lines = [
        "| run | attention span (tokens) | parameters | GFLOP / token | ratio | tokens | training PFLOP |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {context_text(row)} | {row['parameters'] / 1e6:.1f}M | "
            f"{row['flops_per_token'] / 1e9:.4f} | {row['flops_per_token'] / smallest:.3f} | {row['tokens']:,} | "
            f"{row['train_flops'] / 1e15:.1f} |"
        )
    return "\n".join(lines) + "\n"


def balance_text(rows: List[dict], same_tokens: bool) -> str:
    within = spread(rows) <= FLOPS_TOLERANCE
    return (
        f"FLOPs per token {'within' if within else 'NOT within'} {FLOPS_TOLERANCE:.0%} of each other "
        f"(largest / smallest = {1 + spread(rows):.3f}); "
        + ("every run trains on the same tokens." if same_tokens else "the runs train on DIFFERENT token counts.")
    )


def training_row(run_dir: str) -> dict:
    """Steps, tokens, mean loss over the last steps, tokens/s (median past the first 10% of steps, which
    hold the compilation) and seconds in steps of a finished training run."""
    rows = training_steps(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no training step")
    tail = rows[-LOSS_TAIL_STEPS:]
    steady = rows[len(rows) // 10 :]
    return dict(
        trained_steps=rows[-1]["step"],
        consumed_tokens=rows[-1]["consumed_tokens"],
        final_loss=statistics.fmean(row["loss"] for row in tail),
        tokens_per_s=statistics.median(row["tokens_per_s"] for row in steady),
        train_seconds=sum(row["step_time_s"] for row in rows),
    )


def parse_seeds(text: str) -> List[int]:
    """Seeds separated by spaces or commas ("1234 2 3"), each a distinct integer >= 0; ValueError naming the bad one."""
    seeds = []
    for word in text.replace(",", " ").split():
        if not word.isdigit():
            raise ValueError(f"seeds: {word!r} is not an integer >= 0 (seeds {text!r})")
        if int(word) in seeds:
            raise ValueError(f"seeds: {word} appears twice (seeds {text!r})")
        seeds.append(int(word))
    return seeds


def seed_dirs(out: str, seeds: Sequence[int]) -> List[str]:
    """Where each seed's runs are: OUT/seed-<seed>, or OUT itself for a comparison of one unnamed seed."""
    return [os.path.join(out, f"seed-{seed}") for seed in seeds] or [out]


def run_row(root: str, name: str, label: str) -> dict:
    """One trained and evaluated run under root: its cost, its training and its perplexity."""
    from training.config import load_config

    train_dir = os.path.join(root, name, "train")
    row = cost_row(name, label, load_config(os.path.join(train_dir, "config.yaml")))
    row.update(training_row(train_dir))
    with open(os.path.join(root, name, "perplexity", "perplexity.json")) as f:
        row["perplexity"] = json.load(f)
    return row


def _over_seeds(entries: List[dict], variants: Sequence[str]) -> dict:
    """One bucket's entry over the seeds: exp of the mean loss, and the lowest and highest seed's perplexity."""
    if len({entry["tokens"] for entry in entries}) != 1:
        raise ValueError(f"bucket {entries[0]['bucket']} holds different token counts across the seeds")
    merged = {"bucket": entries[0]["bucket"], "tokens": entries[0]["tokens"]}
    for variant in variants:
        losses = [entry[f"loss_{variant}"] for entry in entries]
        merged[f"loss_{variant}"] = statistics.fmean(losses)
        merged[f"ppl_{variant}"] = math.exp(merged[f"loss_{variant}"])
        merged[f"ppl_{variant}_lowest"] = math.exp(min(losses))
        merged[f"ppl_{variant}_highest"] = math.exp(max(losses))
    return merged


def perplexity_over_seeds(results: List[dict]) -> dict:
    """The perplexity.json of one run evaluated once a seed, merged bucket by bucket (_over_seeds)."""
    first = results[0]
    if any(r["edges"] != first["edges"] or r["ablation"] != first["ablation"] for r in results):
        raise ValueError("the seeds of a run were evaluated with different buckets or ablation")
    variants = ("memory", "ablated") if first["ablation"] else ("memory",)
    merged = dict(first, seeds=len(results))
    for key in ("buckets", "segment_positions"):
        if len({len(r.get(key, [])) for r in results}) != 1:
            raise ValueError(f"the seeds of a run have different {key}")
        merged[key] = [_over_seeds([r[key][i] for r in results], variants) for i in range(len(first.get(key, [])))]
    return merged


def combine_seeds(rows: List[dict], seeds: Sequence[int]) -> dict:
    """One run's row over its seeds: the first seed's cost, the mean final loss, the median tokens/s, the
    mean time in steps, perplexity over the seeds; each seed's own numbers under "seeds"."""
    for seed, row in zip(seeds, rows):
        if row["seed"] != seed:
            raise ValueError(f"run {row['run']!r} in seed-{seed} was trained with seed {row['seed']}")
    if len({(row["trained_steps"], row["consumed_tokens"]) for row in rows}) != 1:
        raise ValueError(f"run {rows[0]['run']!r} trained different steps or tokens across the seeds")
    combined = {k: v for k, v in rows[0].items() if k != "seed"}
    combined.update(
        final_loss=statistics.fmean(row["final_loss"] for row in rows),
        tokens_per_s=statistics.median(row["tokens_per_s"] for row in rows),
        train_seconds=statistics.fmean(row["train_seconds"] for row in rows),
        perplexity=perplexity_over_seeds([row["perplexity"] for row in rows]),
        seeds=[
            {"seed": seed, **{k: row[k] for k in ("final_loss", "tokens_per_s", "train_seconds", "perplexity")}}
            for seed, row in zip(seeds, rows)
        ],
    )
    return combined


def report(out: str, runs_file: str = RUNS_FILE, seeds: Sequence[int] = ()) -> dict:
    """comparison.json's content from <root>/<run>/train (config.yaml, metrics.jsonl) and
    <root>/<run>/perplexity/perplexity.json of every run in the runs file, root OUT or, with seeds,
    each OUT/seed-<seed> (the runs then over their seeds: combine_seeds)."""
    roots = seed_dirs(out, seeds)
    rows = []
    for name, run in load_runs(runs_file).items():
        per_seed = [run_row(root, name, run["label"]) for root in roots]
        rows.append(combine_seeds(per_seed, seeds) if seeds else per_seed[0])
    edges = {tuple(row["perplexity"]["edges"]) for row in rows}
    if len(edges) != 1:
        raise ValueError(f"the runs were evaluated with different buckets: {sorted(edges)}")
    import torch

    return dict(
        runs=rows,
        seeds=list(seeds),
        flops_spread=spread(rows),
        same_tokens=len({row["consumed_tokens"] for row in rows}) == 1,
        buckets=[b["bucket"] for b in rows[0]["perplexity"]["buckets"]],
        documents=rows[0]["perplexity"]["documents"],
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )


def _bucket_columns(result: dict) -> List[tuple]:
    """(column title, run row, variant) of every scored model: each run, and each Infini run with its
    memory ablated at evaluation."""
    columns = []
    for row in result["runs"]:
        columns.append((row["label"], row, "memory"))
        if row["perplexity"]["ablation"]:
            columns.append((f"{row['label']}, memory ablated at evaluation", row, "ablated"))
    return columns


def _ppl_cell(entry: dict, variant: str) -> str:
    """A bucket's perplexity, over several seeds with the lowest and highest seed's in brackets."""
    cell = f"{entry[f'ppl_{variant}']:.3f}"
    if f"ppl_{variant}_lowest" in entry:
        cell += f" ({entry[f'ppl_{variant}_lowest']:.3f}-{entry[f'ppl_{variant}_highest']:.3f})"
    return cell


def _seeds_text(result: dict) -> str:
    seeds = result.get("seeds") or []
    if not seeds:
        return ""
    return (
        f" Every run trained once a seed ({', '.join(str(seed) for seed in seeds)}): training loss and minutes are "
        "means over the seeds, tokens/s their median, and each perplexity is exp of the mean loss over the "
        "seeds, the lowest and highest seed's in brackets."
    )


def markdown(result: dict) -> str:
    rows = result["runs"]
    lines = [
        "## Equal-compute comparison",
        "",
        cost_table(rows),
        balance_text(rows, result["same_tokens"])
        + (f" Device: {result['device']}." if result["device"] else "")
        + " Training tokens count window positions, the few padding positions at document ends included."
        + _seeds_text(result),
        "",
        "| run | steps | tokens | training loss (last steps) | tokens/s | minutes in steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['trained_steps']} | {row['consumed_tokens']:,} | {row['final_loss']:.4f} | "
            f"{row['tokens_per_s']:,.0f} | {row['train_seconds'] / 60:.1f} |"
        )
    columns = _bucket_columns(result)
    lines += [
        "",
        f"Perplexity (per byte) by position on {result['documents']} held-out documents; a token at position p "
        "is predicted from positions < p, streamed a window at a time as in training:",
        "",
        "| positions | tokens | " + " | ".join(title for title, _, _ in columns) + " |",
        "| --- | ---: |" + " ---: |" * len(columns),
    ]
    for i, bucket in enumerate(result["buckets"]):
        tokens = rows[0]["perplexity"]["buckets"][i]["tokens"]
        if not tokens:
            continue
        cells = [_ppl_cell(row["perplexity"]["buckets"][i], variant) for _, row, variant in columns]
        lines.append(f"| {bucket} | {tokens:,} | " + " | ".join(cells) + " |")
    lines += _segment_position_lines(columns)
    return "\n".join(lines) + "\n"


def _segment_position_lines(columns: List[tuple]) -> List[str]:
    """The table by position within the segment (evals.perplexity --segment-bins), when every run has one
    with the same number of parts."""
    parts = {len(row["perplexity"].get("segment_positions", [])) for _, row, _ in columns}
    if len(parts) != 1 or not (k := parts.pop()):
        return []
    lines = [
        "",
        "Past each document's first segment, perplexity by where a token sits in its segment, cut into "
        f"{k} equal parts (full attention's segment is its window). Tokens at a segment's start see least "
        "through local attention:",
        "",
        "| part of the segment | " + " | ".join(title for title, _, _ in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for i in range(k):
        cells = [_ppl_cell(row["perplexity"]["segment_positions"][i], variant) for _, row, variant in columns]
        lines.append(f"| {i + 1} of {k} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict, path: str) -> None:
    """Perplexity by position bucket, one line per scored model (matplotlib, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    shown = [i for i, _ in enumerate(result["buckets"]) if result["runs"][0]["perplexity"]["buckets"][i]["tokens"]]
    colors = {}
    for title, row, variant in _bucket_columns(result):
        values = [row["perplexity"]["buckets"][i][f"ppl_{variant}"] for i in shown]
        # A run's ablated evaluation in the run's colour, dashed.
        (line,) = ax.plot(
            range(len(shown)),
            values,
            marker="o",
            linestyle="--" if variant == "ablated" else "-",
            color=colors.get(row["run"]),
            label=title,
        )
        colors[row["run"]] = line.get_color()
        entries = [row["perplexity"]["buckets"][i] for i in shown]
        if f"ppl_{variant}_lowest" in entries[0]:
            ax.fill_between(
                range(len(shown)),
                [e[f"ppl_{variant}_lowest"] for e in entries],
                [e[f"ppl_{variant}_highest"] for e in entries],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.set_xticks(range(len(shown)), [result["buckets"][i] for i in shown])
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("perplexity per byte")
    shape = result["runs"][0]
    ax.set_title(
        f"Equal compute: {shape['parameters'] / 1e6:.0f}M parameters, {shape['consumed_tokens'] / 1e6:.1f}M tokens "
        f"each, {result['documents']} held-out documents",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.long_context", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    n = sub.add_parser("runs", help="print the names of the runs")
    n.add_argument("--runs", default=RUNS_FILE, metavar="FILE")
    s = sub.add_parser("seeds", help="check a list of seeds and print it, separated by spaces")
    s.add_argument("seeds", metavar='"S1 S2 ..."')
    o = sub.add_parser("overrides", help="print a run's overrides for the trainer's command line")
    o.add_argument("run")
    o.add_argument("--runs", default=RUNS_FILE, metavar="FILE")
    f = sub.add_parser("flops", help="parameters, FLOPs per token and tokens of every run, from the configs")
    f.add_argument("--config", default=BASE_CONFIG, metavar="FILE")
    f.add_argument("--runs", default=RUNS_FILE, metavar="FILE")
    f.add_argument("overrides", nargs="*", help="key=value overrides of the base config, before each run's")
    r = sub.add_parser("report", help="OUT/comparison.json and OUT/comparison.md from a finished comparison")
    r.add_argument("out", metavar="OUT")
    r.add_argument("--runs", default=RUNS_FILE, metavar="FILE")
    r.add_argument(
        "--seeds", default="", metavar='"S1 S2 ..."', help="the runs were trained once a seed, in OUT/seed-<seed>"
    )
    p = sub.add_parser("plot", help="perplexity by position from comparison.json (needs matplotlib)")
    p.add_argument("result", metavar="JSON")
    p.add_argument("--out", default=None, metavar="PNG", help="default: comparison.png beside the JSON")
    a = ap.parse_args(argv)
    try:
        if a.command == "runs":
            print(" ".join(load_runs(a.runs)))
        elif a.command == "seeds":
            print(" ".join(str(seed) for seed in parse_seeds(a.seeds)))
        elif a.command == "overrides":
            runs = load_runs(a.runs)
            if a.run not in runs:
                raise ValueError(f"{a.runs} has no run {a.run!r} (runs: {', '.join(runs)})")
            print(" ".join(runs[a.run]["overrides"]))
        elif a.command == "flops":
            runs = load_runs(a.runs)
            rows = [
                cost_row(name, runs[name]["label"], cfg)
                for name, cfg in run_configs(a.config, a.runs, a.overrides).items()
            ]
            print(cost_table(rows) + "\n" + balance_text(rows, len({row["tokens"] for row in rows}) == 1))
        elif a.command == "report":
            result = report(a.out, a.runs, parse_seeds(a.seeds))
            with open(os.path.join(a.out, "comparison.json"), "w") as fh:
                json.dump(result, fh, indent=1)
            table = markdown(result)
            with open(os.path.join(a.out, "comparison.md"), "w") as fh:
                fh.write(table)
            print(table)
            print(f"wrote {a.out}/comparison.json and comparison.md")
        else:
            with open(a.result) as fh:
                result = json.load(fh)
            out = a.out or os.path.join(os.path.dirname(a.result), "comparison.png")
            plot(result, out)
            print(f"wrote {out}")
    except (OSError, ValueError) as error:
        print(f"long_context: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
