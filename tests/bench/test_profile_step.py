"""bench/profile_step.py's idle breakdown on a hand-made chrome trace (which gaps count, whom they are
charged to, which host calls count as synchronisations), its table beside the baseline, and
bench/profile_anchor.py running the baseline script's model."""

import gc
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.profile_anchor import profile_anchor
from bench.profile_step import (
    category_table,
    gpu_work,
    idle_breakdown,
    matmul_shapes,
    python_gc_recorded,
    side_by_side,
    time_by_category,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANCHOR = os.path.join(REPO, "..", "shared", "bench", "anchor_bench.py")


def op(name, ts, dur, tid=1, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


def launch(correlation, ts, tid=1, name="cudaLaunchKernel"):
    return {
        "ph": "X",
        "cat": "cuda_runtime",
        "name": name,
        "ts": ts,
        "dur": 2,
        "tid": tid,
        "args": {"correlation": correlation},
    }


def kernel(correlation, ts, dur, cat="kernel"):
    return {
        "ph": "X",
        "cat": cat,
        "name": f"k{correlation}",
        "ts": ts,
        "dur": dur,
        "tid": 7,
        "args": {"correlation": correlation},
    }


@pytest.fixture
def trace(tmp_path):
    events = [
        # Host side: a step annotation around a matmul, a copy, an item() that synchronises, a norm.
        op("step", 0, 1000, cat="user_annotation"),
        op("aten::mm", 10, 20),
        op("aten::copy_", 100, 10),
        op("aten::item", 300, 100),
        op("aten::_local_scalar_dense", 305, 90),
        op("aten::linalg_vector_norm", 500, 10),
        op("aten::mm", 700, 10),
        launch(1, 12),
        launch(2, 102, name="cudaMemcpyAsync"),
        launch(3, 502),
        launch(4, 702),
        launch(5, 703),
        # The item() waits on the GPU; a cudaDeviceSynchronize outside any operator.
        launch(99, 310, name="cudaStreamSynchronize") | {"dur": 80},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 2000, "dur": 50, "tid": 1},
        # Another outside any operator, on a thread with Python frames (--python-stack): named by them.
        op("training/train.py(10): fit", 2900, 300, tid=2, cat="python_function"),
        op("training/step.py(20): run_schedule", 2950, 200, tid=2, cat="python_function"),
        op("torch/cuda/__init__.py(30): synchronize", 3000, 100, tid=2, cat="python_function"),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 3010, "dur": 40, "tid": 2},
        # GPU side: busy 20-110, a copy 115-150 (gap 5 us: not counted), idle until 600 (450 us, charged to
        # the norm), busy 600-610, idle until 720 (110 us, charged to the mm inside the step), then a kernel
        # that overlaps the previous one (no gap).
        kernel(1, 20, 90),
        kernel(2, 115, 35, cat="gpu_memcpy"),
        kernel(3, 600, 10),
        kernel(4, 720, 50),
        kernel(5, 760, 5),
        # Not complete events: ignored.
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 5000, "tid": 7},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return str(path)


def test_gaps_are_charged_to_the_launching_operators(trace):
    gaps, _, _ = idle_breakdown(trace, steps=2, top=10)
    assert gaps == [
        ("step > aten::linalg_vector_norm", pytest.approx(0.5), pytest.approx(0.450 / 2)),
        ("step > aten::mm", pytest.approx(0.5), pytest.approx(0.110 / 2)),
    ]


def test_synchronisations_are_named_by_their_operators(trace):
    _, syncs, _ = idle_breakdown(trace, steps=1, top=10)
    assert syncs == [
        ("cudaStreamSynchronize: step > aten::item > aten::_local_scalar_dense", 1, pytest.approx(0.080)),
        ("cudaDeviceSynchronize: (no host operator)", 1, pytest.approx(0.050)),
        (
            "cudaDeviceSynchronize: (python) training/step.py(20): run_schedule > "
            "torch/cuda/__init__.py(30): synchronize",
            1,
            pytest.approx(0.040),
        ),
    ]


def test_the_largest_gaps_name_what_the_host_was_in(trace):
    _, _, largest = idle_breakdown(trace, steps=1, top=10)
    # The 450 us gap (150-600) has its middle at 375, inside the item() call; the 110 us one (610-720)
    # at 665, inside only the step.
    assert largest == [
        (pytest.approx(0.450), "step > aten::item > aten::_local_scalar_dense", "step > aten::linalg_vector_norm"),
        (pytest.approx(0.110), "step", "step > aten::mm"),
    ]


def test_categories_leave_out_the_ranges_that_span_kernels():
    def event(key, device_us, device="CUDA", annotation=False):
        return SimpleNamespace(
            key=key,
            device_time_total=device_us,
            self_device_time_total=device_us,
            device_type=SimpleNamespace(name=device),
            is_user_annotation=annotation,
        )

    events = [
        event("nvjet_sm90_tst_256x128", 3000.0),
        event("## Call CompiledFxGraph abc ##", 5000.0, annotation=True),
        event("aten::mm", 3000.0, device="CPU"),
        event("triton_poi_fused_add", 1000.0),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert time_by_category(gpu_work(prof), steps=2) == {"matmul": 1.5, "elementwise (compiled)": 0.5}


def test_matmul_shapes_give_each_products_rate():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    x, y = torch.randn(4, 8, 32), torch.randn(4, 32, 8)
    out = torch.empty(4, 8, 8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(6):
            torch.mm(a, b)
        # As compiled graphs call it: into a given output.
        for _ in range(2):
            torch.bmm(x, y, out=out)
    rows = {(op, shapes): (calls, ms, tflops) for op, shapes, calls, ms, tflops in matmul_shapes(prof, 2, top=10)}
    calls, ms, tflops = rows[("aten::mm", "[64, 32] x [32, 16]")]
    assert calls == 3
    assert tflops == pytest.approx(3 * 2 * 64 * 32 * 16 / (ms * 1e-3) / 1e12)
    calls, ms, tflops = rows[("aten::bmm", "[4, 8, 32] x [4, 32, 8]")]
    assert calls == 1
    assert tflops == pytest.approx(2 * 4 * 8 * 32 * 8 / (ms * 1e-3) / 1e12)


def test_garbage_collections_are_counted_and_put_in_the_trace():
    with profile(activities=[ProfilerActivity.CPU]) as prof, python_gc_recorded() as collections:
        gc.collect()
    assert collections[2][0] == 1 and collections[2][1] > 0
    assert "python gc, generation 2" in {event.key for event in prof.key_averages()}
    # The callback is gone afterwards.
    gc.collect()
    assert collections[2][0] == 1


def test_side_by_side_compares_per_thousand_tokens():
    ours = {"matmul": 600.0, "copy / cast": 90.0}  # ms a step of 300,000 tokens, 720 ms of wall time
    baseline = {"tokens": 16384, "wall_ms": 40.96, "categories": {"matmul": 32.768, "optimizer": 1.6384}}
    rows = side_by_side(ours, 300_000, 720.0, baseline)
    assert rows[2:] == [
        "| matmul | 2,000.0 | 2,000.0 | +0.0 |",
        "| copy / cast | 300.0 | 0.0 | +300.0 |",
        "| optimizer | 0.0 | 100.0 | -100.0 |",
        "| GPU busy | 2,300.0 | 2,100.0 | +200.0 |",
        "| GPU idle | 100.0 | 400.0 | -300.0 |",
        "| step (wall) | 2,400.0 | 2,500.0 | -100.0 |",
    ]


def test_category_table_gives_shares_of_the_wall_and_the_idle_rest():
    assert category_table({"matmul": 60.0, "attention (SDPA)": 25.0}, 100.0)[2:] == [
        "| matmul | 60.0 | 60.0% |",
        "| attention (SDPA) | 25.0 | 25.0% |",
        "| GPU idle | 15.0 | 15.0% |",
    ]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(ANCHOR), reason="the baseline script is not on this machine")
def test_profile_anchor_runs_the_baseline_model(monkeypatch):
    monkeypatch.setenv("ANCHOR_MB", "1")
    result = profile_anchor(ANCHOR, "125m", warmup=1, steps=1, seq=16)
    assert result["tokens"] == 16
    assert result["wall_ms"] > 0
    # On the CPU no kernel runs on a device; on a GPU every category's time is positive.
    assert all(ms > 0 for ms in result["categories"].values())
