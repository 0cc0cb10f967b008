"""The layers' weight-gradient GEMMs of one microbatch, with the step's sum kept three ways (CUDA).

    python bench/weight_gradients.py [--sizes 1.3b,350m] [--iters 30]

For the qkv, projection, fc1 and fc2 weights of a model preset, at the rows of one microbatch of its GPU
run config, GPU ms of:
  * the GEMM alone (bf16 result);
  * the GEMM, then an add into a bf16 sum (autograd's accumulation into ``.grad``);
  * the GEMM adding into a float32 sum itself (``performance.fused_weight_gradients``);
  * the GEMM adding into a bf16 sum itself (``performance.weight_gradient_sum=weight``).
Then the relative error against float64 of a float32 and a bf16 sum of four microbatches.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling.weight_gradients import accumulate_weight_gradient  # noqa: E402

# Preset shapes (configs/model/) and the rows of one microbatch of their GPU run configs (lanes x 16,384).
SHAPES = {
    "125m": dict(hidden=768, ffn=2048, layers=12, rows=8 * 16384),
    "350m": dict(hidden=1024, ffn=2816, layers=24, rows=3 * 16384),
    "1.3b": dict(hidden=2048, ffn=5504, layers=24, rows=16384),
}
WAYS = ("GEMM alone", "GEMM + bf16 add", "GEMM into float32 sum", "GEMM into bf16 sum")


def gpu_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def weight_times(rows: int, out_features: int, in_features: int, iters: int) -> dict:
    grad_output = torch.randn(rows, out_features, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    sum16 = torch.zeros(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    sum32 = torch.zeros(out_features, in_features, device="cuda", dtype=torch.float32)
    return {
        WAYS[0]: gpu_ms(lambda: torch.mm(grad_output.t(), x), iters),
        WAYS[1]: gpu_ms(lambda: sum16.add_(torch.mm(grad_output.t(), x)), iters),
        WAYS[2]: gpu_ms(lambda: accumulate_weight_gradient(sum32, grad_output, x), iters),
        WAYS[3]: gpu_ms(lambda: accumulate_weight_gradient(sum16, grad_output, x), iters),
    }


def sum_errors(rows: int, hidden: int, microbatches: int = 4) -> tuple[float, float]:
    grad_output = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    exact = (grad_output.double().t() @ x.double()) * microbatches
    sum32 = torch.zeros(hidden, hidden, device="cuda")
    sum16 = torch.zeros(hidden, hidden, device="cuda", dtype=torch.bfloat16)
    for _ in range(microbatches):
        accumulate_weight_gradient(sum32, grad_output, x)
        sum16.add_(torch.mm(grad_output.t(), x))
    rel = lambda s: ((s.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    return rel(sum32), rel(sum16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1.3b,350m", help=f"of {','.join(SHAPES)}")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}; GPU ms of one microbatch's weight-gradient GEMMs, all layers")
    print("| size | rows | " + " | ".join(WAYS) + " | float32 sum, rel. error | bf16 sum, rel. error |")
    print("| --- | ---: | " + " | ".join("---:" for _ in WAYS) + " | ---: | ---: |")
    for size in args.sizes.split(","):
        shape = SHAPES[size]
        h, f = shape["hidden"], shape["ffn"]
        totals = dict.fromkeys(WAYS, 0.0)
        for out_features, in_features in ((3 * h, h), (h, h), (2 * f, h), (h, f)):
            for way, ms in weight_times(shape["rows"], out_features, in_features, args.iters).items():
                totals[way] += ms * shape["layers"]
        err32, err16 = sum_errors(shape["rows"], h)
        cells = " | ".join(f"{totals[way]:.2f}" for way in WAYS)
        print(f"| {size} | {shape['rows']:,} | {cells} | {err32:.1e} | {err16:.1e} |")


if __name__ == "__main__":
    main()
