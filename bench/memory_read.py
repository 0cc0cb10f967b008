"""Forward + backward time of the Infini memory read and gate mix: eager, torch.compile'd, fused Triton.

    python bench/memory_read.py [--config configs/gpu_1.3b.yaml] [--lanes N] [--segments N]
                                [--fp32-products] [--learned-scales] [--iters 50]

One layer's read at a run config's shape (heads, KV groups, head dim, segment length, segments a
window and lanes a microbatch; configs/gpu_1.3b.yaml by default) with bf16 activations, q laid out
as the attention passes it (a permuted view of megatron's [t, b, h, d]):
modeling.infini_attention.read_and_mix as the eager path runs it, the same function under
torch.compile, and modeling.memory_kernels.memory_read. Products on bf16 operands where the config's
performance.half_memory_products says so, unless --fp32-products. Prints a table: milliseconds per
forward + backward (median of --iters, CUDA events), the speedup over eager, and the MiB the forward
leaves allocated for backward (its output included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from modeling.infini_attention import read_and_mix  # noqa: E402
from modeling.memory_kernels import memory_read  # noqa: E402
from training.config import load_config  # noqa: E402


def make_inputs(b, h, g, s, n, d, learned_scales):
    """q, local (bf16), M_before, z_before (float32, the empty memory first), gate, query scale: leaves."""
    t = s * n
    q = torch.randn(t, b, h, d, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
    local = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    M = torch.randn(b, g, s, d, d, device="cuda") * n
    z = torch.rand(b, g, s, d, device="cuda") * n + 1.0
    M[:, :, 0], z[:, :, 0] = 0.0, 0.0
    gate = torch.zeros(h, device="cuda")
    scale = torch.ones(h, device="cuda") if learned_scales else 1.0
    leaves = [q, local, M, z, gate] + ([scale] if learned_scales else [])
    for x in leaves:
        x.requires_grad_()
    return (q, local, M, z, gate, scale), leaves


def measure(fn, inputs, leaves, iters):
    """(median ms of forward + backward, MiB the forward leaves allocated)."""
    out_grad = torch.randn(inputs[0].shape[:3] + (inputs[2].shape[-1],), device="cuda", dtype=torch.bfloat16)

    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, out_grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn(*inputs)
    saved = (torch.cuda.memory_allocated() - before) / 2**20
    del out
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "gpu_1.3b.yaml"), help="a run config")
    parser.add_argument("--lanes", type=int, help="sequences per microbatch (default: the config's)")
    parser.add_argument("--segments", type=int, help="segments per window (default: the config's)")
    parser.add_argument("--fp32-products", action="store_true", help="float32 operands (TF32, as performance.tf32)")
    parser.add_argument("--learned-scales", action="store_true", help="a query scale tensor with its gradient")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/memory_read.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # performance.tf32's default, as the trainer sets it

    cfg = load_config(args.config)
    model = cfg.model
    h, g, d, n = model.num_attention_heads, model.query_groups, model.head_dim, model.segment_length
    lanes = args.lanes or cfg.parallel.micro_batch_lanes
    segments = args.segments or cfg.data.n_segments
    inputs, leaves = make_inputs(lanes, h, g, segments, n, d, args.learned_scales)
    half = cfg.performance.half_memory_products and not args.fp32_products

    def eager(*xs):
        return read_and_mix(*xs, half_products=half)

    def fused(*xs):
        return memory_read(*xs, half_products=half)

    variants = {"eager": eager, "torch.compile": torch.compile(eager), "fused (Triton)": fused}
    print(
        f"memory read + gate mix, fwd+bwd: b={lanes} h={h} g={g} d={d} segments={segments}x{n}, "
        f"bf16, {'bf16' if half else 'fp32'} products, "
        f"{'learned' if args.learned_scales else 'fixed'} query scale, {torch.cuda.get_device_name()}"
    )
    print(f"{'variant':<16} {'ms':>8} {'speedup':>8} {'saved MiB':>10}")
    baseline = None
    for name, fn in variants.items():
        ms, saved = measure(fn, inputs, leaves, args.iters)
        baseline = baseline or ms
        print(f"{name:<16} {ms:>8.3f} {baseline / ms:>8.2f} {saved:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
