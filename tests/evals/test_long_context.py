"""The equal-compute comparison: its configs cost the same FLOPs per token (modeling/flops.py) and
train on the same tokens; its script runs end to end at CPU size (data, every training, evaluation,
report, plot), a part of the runs first and then the rest, skipping what is done; run again, it only
rewrites the report."""

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from evals.long_context import BASE_CONFIG, FLOPS_TOLERANCE, RUNS_FILE, load_runs, run_configs
from modeling.flops import model_cost
from training.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Infini-attention with the paper's gate start, with gates starting local (linear and delta write), local
# attention, full attention.
RUNS = ["infini", "infini_gates_local", "infini_delta_gates_local", "local", "full"]


def flops(cfg) -> float:
    return model_cost(cfg.model).flops_per_token


def window_tokens(cfg) -> int:
    return cfg.data.global_lanes * cfg.data.n_segments * cfg.model.segment_length


def assert_same_shape_and_training(cfg, base, memory_settings: tuple) -> None:
    """The model settings other than memory_settings, the optimizer, schedule, parallel layout and
    precision are base's."""
    shape = {k: v for k, v in vars(base.model).items() if k not in memory_settings}
    assert {k: v for k, v in vars(cfg.model).items() if k not in memory_settings} == shape
    assert (cfg.optimizer, cfg.schedule, cfg.parallel, cfg.precision) == (
        base.optimizer,
        base.schedule,
        base.parallel,
        base.precision,
    )


# Each comparison: its base config and its runs file.
COMPARISONS = {
    "104M": (BASE_CONFIG, RUNS_FILE),
    "19.7M": ("configs/experiments/long_context_small.yaml", "configs/experiments/long_context_small_runs.yaml"),
}


def load_comparison(name: str) -> tuple:
    """(base config path, runs file path, each run's config) of a comparison."""
    config, runs_file = (os.path.join(REPO, path) for path in COMPARISONS[name])
    return config, runs_file, run_configs(config, runs_file)


@pytest.fixture(scope="module")
def configs():
    return load_comparison("104M")[2]


@pytest.fixture(scope="module", params=list(COMPARISONS))
def comparison(request):
    return load_comparison(request.param)


def test_the_runs_are_infini_local_and_full_attention_of_one_shape(configs):
    assert list(configs) == RUNS
    infini, gates_local, delta, local, full = configs.values()
    assert [cfg.model.memory for cfg in configs.values()] == [True, True, True, False, False]
    assert (infini.model.gate_init, gates_local.model.gate_init, delta.model.gate_init) == (0.0, -3.0, -3.0)
    assert (infini.model.update, gates_local.model.update, delta.model.update) == ("linear", "linear", "delta")
    assert local.model.segment_length == infini.model.segment_length < full.model.segment_length
    # The memory's own settings aside (its switch, its learned read, its gates' start, its write), one shape.
    memory_settings = ("memory", "learned_memory_scales", "gate_init", "update", "segment_length")
    for cfg in (gates_local, delta, local, full):
        assert_same_shape_and_training(cfg, infini, memory_settings)
    assert infini.precision == "bf16" and infini.performance.compile_layers


def test_the_smaller_comparison_is_the_delta_write_from_local_gates_local_and_full_attention_of_one_shape():
    configs = load_comparison("19.7M")[2]
    assert list(configs) == ["infini_delta_gates_local", "local", "full"]
    infini, local, full = configs.values()
    assert (infini.model.memory, infini.model.update, infini.model.gate_init) == (True, "delta", -3.0)
    assert infini.model.learned_memory_scales and not local.model.memory and not full.model.memory
    assert local.model.segment_length == infini.model.segment_length < full.model.segment_length
    for cfg in (local, full):
        assert_same_shape_and_training(cfg, infini, ("memory", "learned_memory_scales", "segment_length"))
    # More tokens a parameter than the 104M comparison, so that its seeds agree.
    tokens = infini.schedule.steps * window_tokens(infini)
    assert tokens / model_cost(infini.model).parameters > 5


def test_flops_per_token_within_5_percent_and_the_same_tokens(comparison):
    _, _, configs = comparison
    per_token = [flops(cfg) for cfg in configs.values()]
    assert max(per_token) / min(per_token) - 1 <= FLOPS_TOLERANCE
    # The same steps of the same tokens a step: the same tokens, and so training FLOPs within 5% too.
    assert len({cfg.schedule.steps for cfg in configs.values()}) == 1
    assert len({window_tokens(cfg) for cfg in configs.values()}) == 1


def test_the_full_attention_window_is_the_longest_multiple_of_64_within_5_percent(comparison):
    config, runs_file, configs = comparison
    full = configs["full"]
    longer = load_config(
        config,
        [*load_runs(runs_file)["full"]["overrides"], f"model.segment_length={full.model.segment_length + 64}"],
    )
    per_token = [flops(cfg) for name, cfg in configs.items() if name != "full"] + [flops(longer)]
    assert max(per_token) / min(per_token) - 1 > FLOPS_TOLERANCE
    assert full.model.segment_length % 64 == 0


def test_flops_cli_prints_the_same_balance(capsys):
    from evals.long_context import main

    assert main(["flops", "--config", os.path.join(REPO, BASE_CONFIG), "--runs", os.path.join(REPO, RUNS_FILE)]) == 0
    out = capsys.readouterr().out
    assert "FLOPs per token within 5% of each other" in out and "every run trains on the same tokens" in out


def bucket(name, tokens, **losses):
    return {"bucket": name, "tokens": tokens, **{f"loss_{k}": v for k, v in losses.items()}}


def test_perplexity_over_seeds_is_exp_of_the_mean_loss_with_the_extreme_seeds():
    from evals.long_context import perplexity_over_seeds

    # Per-byte losses ln 4 and ln 9: the geometric mean of the perplexities is 6, the extremes 4 and 9.
    seed_1 = {"edges": [1024], "ablation": True, "buckets": [bucket("[0, 1K)", 10, memory=math.log(4), ablated=1.0)]}
    seed_2 = {"edges": [1024], "ablation": True, "buckets": [bucket("[0, 1K)", 10, memory=math.log(9), ablated=2.0)]}
    (merged,) = perplexity_over_seeds([seed_1, seed_2])["buckets"]
    assert merged["ppl_memory"] == pytest.approx(6.0, rel=1e-12)
    assert (merged["ppl_memory_lowest"], merged["ppl_memory_highest"]) == pytest.approx((4.0, 9.0), rel=1e-12)
    assert merged["ppl_ablated"] == pytest.approx(math.exp(1.5), rel=1e-12) and merged["tokens"] == 10
    other_buckets = dict(seed_2, edges=[2048])
    with pytest.raises(ValueError, match="different buckets"):
        perplexity_over_seeds([seed_1, other_buckets])


def test_seeds_are_distinct_integers():
    from evals.long_context import main, parse_seeds

    assert parse_seeds("1234 2,3") == [1234, 2, 3] and parse_seeds("") == []
    with pytest.raises(ValueError, match="'x' is not an integer"):
        parse_seeds("1 x")
    with pytest.raises(ValueError, match="2 appears twice"):
        parse_seeds("2 3 2")
    assert main(["seeds", "-1"]) == 1


def write_corpus(path):
    """A tiny corpus in fetch's format: six training documents of 30K bytes, two held out of 9K."""
    import glob
    import lzma

    sources = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    text = "".join(open(f, errors="replace").read() for f in sources[:40])
    os.makedirs(path)
    for split, docs, size in (("train", range(6), 30000), ("heldout", range(6, 8), 9000)):
        with lzma.open(os.path.join(path, f"{split}.jsonl.xz"), "wt") as f:
            for i in docs:
                record = {
                    "id": f"doc{i}",
                    "text": text[i * 30000 : i * 30000 + size],
                    "source": "stdlib",
                    "licence": "PSF",
                }
                f.write(json.dumps(record) + "\n")


TINY = (
    "precision=fp32 model.num_layers=1 model.hidden_size=32 model.num_attention_heads=2 model.num_query_groups=2 "
    "model.ffn_hidden_size=64 data.global_lanes=2 parallel.micro_batch_lanes=2 data.num_workers=0 schedule.steps=3 "
    "schedule.warmup_steps=1 checkpoint.interval=0 checkpoint.async_save=false performance.compile_layers=false"
)


def run_script(out, corpus, **settings):
    env = dict(
        os.environ,
        **settings,
        CORPUS=corpus,
        TRAIN_OVERRIDES=TINY,
        BUCKETS="1k,2k,4k",
        EVAL_DOCS="2",
        EVAL_MAX_TOKENS="6000",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=REPO,
        LAUNCH=sys.executable,
    )
    return subprocess.run(
        ["bash", "configs/experiments/long_context_run.sh", out],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_script_runs_end_to_end_and_skips_what_is_done(tmp_path):
    out, corpus = str(tmp_path / "out"), str(tmp_path / "corpus")
    write_corpus(corpus)
    # A part of the runs first (as under a time limit per command): no report until every run is done.
    part = run_script(out, corpus, RUNS="infini local")
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    assert "== training infini:" in part.stdout and "== training local:" in part.stdout
    assert "not yet trained and evaluated: infini_gates_local infini_delta_gates_local full" in part.stdout
    assert not os.path.exists(os.path.join(out, "comparison.json"))
    # Then the whole command: the finished runs are skipped, the others trained, the report written.
    proc = run_script(out, corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("== training")] == [
        "== training infini_gates_local",
        "== training infini_delta_gates_local",
        "== training full",
    ]
    assert [line for line in lines if line.startswith("== evaluating")] == [
        "== evaluating infini_gates_local",
        "== evaluating infini_delta_gates_local",
        "== evaluating full",
    ]

    with open(os.path.join(out, "comparison.json")) as f:
        result = json.load(f)
    runs = {row["run"]: row for row in result["runs"]}
    assert list(runs) == RUNS
    assert result["same_tokens"] and {row["consumed_tokens"] for row in runs.values()} == {3 * 2 * 6656}
    assert result["buckets"] == ["[0, 1K)", "[1K, 2K)", "[2K, 4K)", "[4K, end)"]
    assert result["documents"] == 2
    for name, row in runs.items():
        exported = OmegaConf.load(os.path.join(out, name, "export", "model_config.yaml"))
        assert (exported.memory, exported.segment_length) == (row["memory"], row["segment_length"])
        assert exported.hidden_size == 32  # TRAIN_OVERRIDES, then the run's own overrides
        assert row["trained_steps"] == 3 and row["perplexity"]["ablation"] == name.startswith("infini")
        # Every held-out token but each document's first is scored, in its position's bucket.
        assert sum(b["tokens"] for b in row["perplexity"]["buckets"]) == 2 * (6000 - 1)
        # SEGMENT_BINS (default 8): every token past its document's first segment, by place in its segment.
        parts = row["perplexity"]["segment_positions"]
        assert len(parts) == 8 and sum(b["tokens"] for b in parts) == 2 * (6000 - row["segment_length"])
    assert (runs["full"]["segment_length"], runs["infini"]["segment_length"]) == (832, 512)
    report = open(os.path.join(out, "comparison.md")).read()
    assert "| Infini-attention, segments of 512, memory ablated at evaluation |" in report
    assert "| [4K, end) | 3,808 |" in report
    assert "cut into 8 equal parts" in report and "| 8 of 8 |" in report
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 0

    again = run_script(out, corpus)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "== training" not in again.stdout and "== evaluating" not in again.stdout
    assert "wrote " + os.path.join(out, "comparison.json") in again.stdout


@pytest.mark.slow
def test_script_trains_every_run_once_a_seed_and_reports_over_the_seeds(tmp_path):
    out, corpus = str(tmp_path / "out"), str(tmp_path / "corpus")
    write_corpus(corpus)
    runs_file = tmp_path / "runs.yaml"
    runs_file.write_text("infini: {label: Infini-attention, overrides: []}\n")
    proc = run_script(out, corpus, RUNS_FILE=str(runs_file), SEEDS="7 8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("== training")] == [
        "== training seed-7/infini",
        "== training seed-8/infini",
    ]
    with open(os.path.join(out, "comparison.json")) as f:
        result = json.load(f)
    assert result["seeds"] == [7, 8]
    for row in result["runs"]:
        per_seed = []
        for seed in (7, 8):
            run_dir = os.path.join(out, f"seed-{seed}", row["run"])
            assert load_config(os.path.join(run_dir, "train", "config.yaml")).seed == seed
            with open(os.path.join(run_dir, "perplexity", "perplexity.json")) as f:
                per_seed.append(json.load(f)["buckets"])
        # Other initial weights, other losses; the same held-out tokens.
        assert per_seed[0][0]["loss_memory"] != per_seed[1][0]["loss_memory"]
        for i, merged in enumerate(row["perplexity"]["buckets"]):
            losses = [buckets[i]["loss_memory"] for buckets in per_seed]
            assert merged["tokens"] == per_seed[0][i]["tokens"] == per_seed[1][i]["tokens"]
            assert merged["ppl_memory"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-12)
            assert merged["ppl_memory_lowest"] == pytest.approx(math.exp(min(losses)), rel=1e-12)
            assert merged["ppl_memory_highest"] == pytest.approx(math.exp(max(losses)), rel=1e-12)
        assert [s["seed"] for s in row["seeds"]] == [7, 8]
    report = open(os.path.join(out, "comparison.md")).read()
    assert "Every run trained once a seed (7, 8)" in report
    first = result["runs"][0]["perplexity"]["buckets"][0]
    cell = f"{first['ppl_memory']:.3f} ({first['ppl_memory_lowest']:.3f}-{first['ppl_memory_highest']:.3f})"
    assert cell in report
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 0  # each line with its seeds' band

    again = run_script(out, corpus, RUNS_FILE=str(runs_file), SEEDS="7 8")
    assert again.returncode == 0 and "== training" not in again.stdout and "== evaluating" not in again.stdout
    bad = run_script(out, corpus, RUNS_FILE=str(runs_file), SEEDS="7 seven")
    assert bad.returncode != 0 and "'seven' is not an integer" in bad.stderr
