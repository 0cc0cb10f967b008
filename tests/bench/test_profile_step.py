"""bench/profile_step.py's idle breakdown on a hand-made chrome trace: which gaps count, whom they are
charged to, and which host calls count as synchronisations."""

import json

import pytest

from bench.profile_step import idle_breakdown


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
    gaps, _ = idle_breakdown(trace, steps=2, top=10)
    assert gaps == [
        ("step > aten::linalg_vector_norm", pytest.approx(0.5), pytest.approx(0.450 / 2)),
        ("step > aten::mm", pytest.approx(0.5), pytest.approx(0.110 / 2)),
    ]


def test_synchronisations_are_named_by_their_operators(trace):
    _, syncs = idle_breakdown(trace, steps=1, top=10)
    assert syncs == [
        ("step > aten::item > aten::_local_scalar_dense", 1, pytest.approx(0.080)),
        ("(no host operator)", 1, pytest.approx(0.050)),
    ]
