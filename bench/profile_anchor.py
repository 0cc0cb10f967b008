"""Where the baseline's training step spends its GPU time, by the same kernel categories as ours.

    python bench/profile_anchor.py --anchor PATH [--shape 1.3b] [--warmup 3] [--steps 2] [--json FILE]

PATH is the baseline script (a plain-PyTorch Llama with compiled blocks; ANCHOR_SHAPE picks its shape).
Its step is run here as its `amp` mode trains: fp32 master weights, bf16 autocast, fused AdamW, cuDNN
or flash attention, microbatch ANCHOR_MB (8) x sequence 2048. Prints GPU ms per step by category and the
GPU idle; --json writes the same with the step's tokens, for bench/profile_step.py --anchor.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.profile_step import category_table, gpu_work, matmul_shapes, matmul_table, time_by_category  # noqa: E402
from bench.throughput import ANCHOR_SHAPES  # noqa: E402


def load_anchor(path: str, shape: str):
    """The baseline script as a module, its shape fixed by ANCHOR_SHAPE (read when it is imported)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--anchor {path}: no such file")
    previous = os.environ.get("ANCHOR_SHAPE")
    os.environ["ANCHOR_SHAPE"] = shape
    try:
        spec = importlib.util.spec_from_file_location("anchor_bench", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["ANCHOR_SHAPE"]
        else:
            os.environ["ANCHOR_SHAPE"] = previous
    return module


def profile_anchor(path: str, shape: str, warmup: int, steps: int, seq: int = 2048) -> dict:
    """{"tokens": tokens a step, "wall_ms": ms a step, "categories": {category: GPU ms a step}}."""
    anchor = load_anchor(path, shape)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = anchor.Llama().to(device)
    for block in model.blocks:
        block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    tokens = torch.randint(0, anchor.V, (anchor.MB, seq + 1), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = anchor.plain_step(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    attention = sdpa_kernel(backends) if cuda else contextlib.nullcontext()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with attention:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities, record_shapes=True) as prof:
            started = time.perf_counter()
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            wall_s = time.perf_counter() - started
    return {
        "tokens": anchor.MB * seq,
        "wall_ms": 1e3 * wall_s / steps,
        "categories": time_by_category(gpu_work(prof), steps),
        "matmuls": matmul_shapes(prof, steps, top=25),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", required=True, help="the baseline script's path")
    parser.add_argument("--shape", default="1.3b", choices=ANCHOR_SHAPES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048, help="tokens a microbatch row (the script's 2048)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = profile_anchor(args.anchor, args.shape, args.warmup, args.steps, args.seq)
    print(f"\nbaseline {args.shape}: {result['tokens']:,} tokens a step, {result['wall_ms']:,.1f} ms a step\n")
    print("\n".join(category_table(result["categories"], result["wall_ms"])))
    print("\nMatrix products by input shape:\n")
    print("\n".join(matmul_table(result["matmuls"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
