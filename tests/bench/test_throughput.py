"""bench/throughput.py on the CPU: its cases resolve to the GPU run configs users train with, and the
baseline script's result lines are read back as it prints them."""

import os
import subprocess
import sys
import types

import pytest

from bench.throughput import (
    ANCHOR_SHAPES,
    CASES,
    anchor_shape,
    baseline_table,
    case_run,
    parse_anchor,
    run_anchor,
    sweep_runs,
)
from modeling.config import ModelConfig
from training.config import CONFIG_ROOT, load_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANCHOR = os.path.join(REPO, "..", "shared", "bench", "anchor_bench.py")

# The f-strings of the baseline script's run() (anchor_bench.py), copied verbatim: a result line and an
# out-of-memory line. test_formats_are_the_baseline_scripts checks them against the script where it is.
LINE_FORMAT = (
    'f"{name:38s} seq={seq:6d} mb={mb}: {tps:9.0f} tok/s  MFU {100*mfu:5.1f}%  peak '
    '{torch.cuda.max_memory_allocated()/2**30:5.1f} GiB  params {n/1e9:.2f}B"'
)
OOM_FORMAT = 'f"{name:38s} seq={seq:6d} mb={mb}: OOM"'


def anchor_line(name, seq, mb, tps, mfu, peak_bytes, n):
    """A result line as the baseline script prints it (torch.cuda stands in for the device's peak memory)."""
    cuda = types.SimpleNamespace(max_memory_allocated=lambda: peak_bytes)
    values = {"name": name, "seq": seq, "mb": mb, "tps": tps, "mfu": mfu, "n": n}
    return eval(LINE_FORMAT, {"torch": types.SimpleNamespace(cuda=cuda)}, values)


def oom_line(name, seq, mb):
    return eval(OOM_FORMAT, {}, {"name": name, "seq": seq, "mb": mb})


def test_formats_are_the_baseline_scripts():
    if not os.path.isfile(ANCHOR):
        pytest.skip(f"no baseline script at {ANCHOR}")
    source = open(ANCHOR).read()
    assert f"print({LINE_FORMAT}, flush=True)" in source
    assert f"print({OOM_FORMAT})" in source


def test_parse_anchor_reads_every_result_line_and_nothing_else():
    # The script's own names: short ones padded to 38 columns, a long one, the long-sequence mode's indented one.
    lines = [
        "/usr/lib/python3/site-packages/torch/_inductor/utils.py:1: UserWarning: 1234 tok/s is not a result",
        anchor_line("plain torch Llama, SDPA cuDNN, compiled", 2048, 8, 57291.4, 0.5383, 53.7 * 2**30, 1.35e9),
        anchor_line(
            "plain torch Llama, fp32 master + autocast, compiled", 2048, 8, 51234.6, 0.4812, 61.24 * 2**30, 1.35e9
        ),
        anchor_line("  same, long sequence", 8192, 2, 49570.0, 0.51, 42.2 * 2**30, 1.35e9),
        oom_line("  same, long sequence", 32768, 1),
        anchor_line("megatron-core GPT, local spec", 2048, 4, 18815.2, 0.177, 68.4 * 2**30, 1.35e9),
        "",
    ]
    assert parse_anchor("\n".join(lines)) == [
        {
            "name": "plain torch Llama, SDPA cuDNN, compiled",
            "seq": 2048,
            "mb": 8,
            "tokens_per_s": 57291.0,
            "mfu": pytest.approx(0.538),
            "peak_gib": 53.7,
        },
        {
            "name": "plain torch Llama, fp32 master + autocast, compiled",
            "seq": 2048,
            "mb": 8,
            "tokens_per_s": 51235.0,
            "mfu": pytest.approx(0.481),
            "peak_gib": 61.2,
        },
        {
            "name": "same, long sequence",
            "seq": 8192,
            "mb": 2,
            "tokens_per_s": 49570.0,
            "mfu": pytest.approx(0.51),
            "peak_gib": 42.2,
        },
        {"name": "same, long sequence", "seq": 32768, "mb": 1, "tokens_per_s": None, "mfu": None, "peak_gib": None},
        {
            "name": "megatron-core GPT, local spec",
            "seq": 2048,
            "mb": 4,
            "tokens_per_s": 18815.0,
            "mfu": pytest.approx(0.177),
            "peak_gib": 68.4,
        },
    ]


STAND_IN = """
import os, sys, types
cuda = types.SimpleNamespace(max_memory_allocated=lambda: 3 * 2**30)
torch = types.SimpleNamespace(cuda=cuda)
shape, mb = os.environ["ANCHOR_SHAPE"], int(os.environ.get("ANCHOR_MB", "8"))
for index, mode in enumerate(sys.argv[1:]):
    name, seq, tps, mfu, n = f"{mode} {shape}", 2048, 1000.0 * (index + 1), 0.1, 1e8
    print(LINE_FORMAT, flush=True)
sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
"""


def test_run_anchor_runs_the_script_at_the_shape_and_microbatch_asked(tmp_path, monkeypatch):
    # A stand-in for the baseline script (which needs CUDA) that prints with its format what it was asked for.
    script = tmp_path / "baseline.py"
    script.write_text(STAND_IN.replace("LINE_FORMAT", LINE_FORMAT))
    monkeypatch.delenv("ANCHOR_MB", raising=False)
    anchor = run_anchor(str(script), "350m", ["compiled", "amp"], microbatch=16)
    assert "error" not in anchor
    assert [(b["name"], b["mb"], b["tokens_per_s"]) for b in anchor["baselines"]] == [
        ("compiled 350m", 16, 1000.0),
        ("amp 350m", 16, 2000.0),
    ]
    assert [b["mb"] for b in run_anchor(str(script), "125m", ["megatron"])["baselines"]] == [8]
    monkeypatch.setenv("STAND_IN_EXIT", "1")
    assert run_anchor(str(script), "1.3b", ["compiled"])["error"].startswith("exit 1")


@pytest.mark.parametrize(
    "case, size, lanes_a_step, lanes_a_microbatch, loss_chunk_tokens",
    [
        ("infini-1.3b", "1.3b", 32, 1, 0),
        ("infini-350m", "350m", 24, 3, 0),
        # Eight lanes' logits in one piece would not fit: 16 GiB in float32.
        ("infini-125m", "125m", 32, 8, 4096),
    ],
)
def test_one_gpu_cases_measure_the_run_config_users_train_with(
    tmp_path, case, size, lanes_a_step, lanes_a_microbatch, loss_chunk_tokens
):
    config, processes, overrides = case_run(case, str(tmp_path / "run"), 12)
    bench = load_config(config, overrides)
    user = load_config(os.path.join(CONFIG_ROOT, f"gpu_{size}.yaml"))
    assert processes == 1
    for section in ("model", "performance", "parallel"):
        assert getattr(bench, section) == getattr(user, section), section
    assert (bench.precision, bench.data.global_lanes, bench.data.n_segments) == (
        user.precision,
        user.data.global_lanes,
        user.data.n_segments,
    )
    # Fast by default: the settings measured fastest (docs/BENCHMARKS.md).
    fast = user.performance
    assert (fast.compile_layers, fast.compile_loss, fast.loss_chunk_tokens, fast.half_memory_products) == (
        True,
        True,
        loss_chunk_tokens,
        True,
    )
    assert (user.precision, user.data.global_lanes, user.parallel.micro_batch_lanes) == (
        "bf16",
        lanes_a_step,
        lanes_a_microbatch,
    )
    assert anchor_shape(user.model) == size


def test_overrides_win_over_the_case_and_its_config(tmp_path):
    config, _, overrides = case_run(
        "infini-350m",
        str(tmp_path / "run"),
        3,
        ["parallel.micro_batch_lanes=4", "performance.half_memory_products=false"],
    )
    cfg = load_config(config, overrides)
    assert (cfg.parallel.micro_batch_lanes, cfg.performance.half_memory_products, cfg.schedule.steps) == (4, False, 3)
    assert cfg.performance.compile_loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_fits_its_layout(tmp_path, case):
    config, processes, overrides = case_run(case, str(tmp_path / "run"), 12)
    validate(load_config(config, overrides), world_size=processes)


def test_anchor_shape_names_a_model_only_of_a_baseline_shape():
    for name in ANCHOR_SHAPES:
        assert anchor_shape(load_config(None, [f"defaults.model={name}"]).model) == name
    assert anchor_shape(load_config(None, ["defaults.model=7b"]).model) is None
    assert anchor_shape(load_config(None, ["defaults.model=1.3b", "model.num_layers=12"]).model) is None
    assert anchor_shape(ModelConfig()) is None


def test_sweep_runs_each_case_once_per_value():
    assert sweep_runs(["a", "b"], "", None) == [("a", [], ""), ("b", [], "")]
    assert sweep_runs(["a", "b"], "f32", "parallel.micro_batch_lanes=1,2") == [
        ("a", ["parallel.micro_batch_lanes=1"], "f32-micro_batch_lanes1"),
        ("a", ["parallel.micro_batch_lanes=2"], "f32-micro_batch_lanes2"),
        ("b", ["parallel.micro_batch_lanes=1"], "f32-micro_batch_lanes1"),
        ("b", ["parallel.micro_batch_lanes=2"], "f32-micro_batch_lanes2"),
    ]


def test_baseline_table_sets_each_case_against_the_baselines_of_its_size():
    results = [
        {"case": "infini-1.3b", "size": "1.3b", "tokens_per_s": 57381.0, "mfu": 0.52},
        {"case": "infini-350m", "size": "350m", "error": "exit 1"},
        {"case": "infini-tiny-cpu", "size": None, "tokens_per_s": 16000.0, "mfu": None},
    ]
    baseline = {"name": "plain", "seq": 2048, "mb": 8, "tokens_per_s": 50000.0, "mfu": 0.5, "peak_gib": 50.0}
    anchors = {
        "1.3b": {"baselines": [baseline, {**baseline, "mb": 16, "tokens_per_s": None, "mfu": None}]},
        "350m": {"baselines": [{**baseline, "tokens_per_s": 100000.0}]},
    }
    rows = baseline_table(results, anchors)[2:]
    assert rows == [
        "| 1.3b | infini-1.3b | 57,381 | 52.0% | plain, seq 2048, mb 8 | 50,000 | 50.0% | 1.15 |",
        "| 1.3b | infini-1.3b | 57,381 | 52.0% | plain, seq 2048, mb 16 | out of memory | | |",
        "| 350m | infini-350m | error | - | plain, seq 2048, mb 8 | 100,000 | 50.0% | |",
    ]


def test_bench_script_imports_as_run(tmp_path):
    # `python bench/throughput.py` puts bench/ first on sys.path, not the checkout: the script must find its packages.
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
