"""Forward + backward time of the Infini memory's read (and gate mix) and write: eager, compiled, fused Triton.

    python bench/memory_kernels.py [--config configs/gpu_1.3b.yaml] [--lanes N] [--segments N]
                                   [--update linear|delta] [--fp32-products] [--learned-scales] [--iters 50]

One layer's memory at a run config's shape (heads, KV groups, head dim, segment length, segments a
window and lanes a microbatch; configs/gpu_1.3b.yaml by default) with bf16 activations, q, k and v laid out
as the attention passes them (permuted views of megatron's [t, b, h, d]). The read:
modeling.infini_attention.read_and_mix as the eager path runs it, the same function under torch.compile,
and modeling.memory_kernels.memory_read. The write (the config's update rule unless --update): the eager
path's sigma(k) and _memories_before_segments, the same under torch.compile, and
modeling.memory_kernels.memory_write; its backward takes gradients of every memory it returns. Products on
bf16 operands where the config's performance.half_memory_products says so, unless --fp32-products. Prints a
table for each: milliseconds per forward + backward (median of --iters, CUDA events), the speedup over
eager, and the MiB the forward leaves allocated for backward (its outputs included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from modeling.infini_attention import _memories_before_segments, read_and_mix, scaled_sigma  # noqa: E402
from modeling.memory_kernels import memory_read, memory_write  # noqa: E402
from training.config import load_config  # noqa: E402


def activation(t, b, heads, d):
    """A bf16 leaf [b, heads, t, d], as a permuted view of [t, b, heads, d]."""
    return torch.randn(t, b, heads, d, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_()


def make_read_inputs(b, h, g, s, n, d, learned_scales):
    """q, local (bf16), M_before, z_before (float32, the empty memory first), gate, query scale; the leaves."""
    t = s * n
    q = activation(t, b, h, d)
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


def make_write_inputs(b, g, s, n, d, learned_scales):
    """k, v (bf16), key scale; the leaves."""
    k, v = activation(s * n, b, g, d), activation(s * n, b, g, d)
    scale = torch.ones(g, device="cuda", requires_grad=True) if learned_scales else 1.0
    return (k, v, scale), [k, v] + ([scale] if learned_scales else [])


def measure(fn, inputs, leaves, iters):
    """(median ms of forward + backward, MiB the forward leaves allocated); fn returns a tuple of tensors."""
    out_grads = [torch.randn_like(x) for x in fn(*inputs)]

    def step():
        torch.autograd.grad(fn(*inputs), leaves, out_grads)

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


def print_table(title, variants, inputs, leaves, iters):
    print(title)
    print(f"{'variant':<16} {'ms':>8} {'speedup':>8} {'saved MiB':>10}")
    baseline = None
    for name, fn in variants.items():
        ms, saved = measure(fn, inputs, leaves, iters)
        baseline = baseline or ms
        print(f"{name:<16} {ms:>8.3f} {baseline / ms:>8.2f} {saved:>10.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "gpu_1.3b.yaml"), help="a run config")
    parser.add_argument("--lanes", type=int, help="sequences per microbatch (default: the config's)")
    parser.add_argument("--segments", type=int, help="segments per window (default: the config's)")
    parser.add_argument("--update", choices=("linear", "delta"), help="the write's rule (default: the config's)")
    parser.add_argument("--fp32-products", action="store_true", help="float32 operands (TF32, as performance.tf32)")
    parser.add_argument("--learned-scales", action="store_true", help="scale tensors with their gradients")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/memory_kernels.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # performance.tf32's default, as the trainer sets it

    cfg = load_config(args.config)
    model = cfg.model
    h, g, d, n = model.num_attention_heads, model.query_groups, model.head_dim, model.segment_length
    lanes = args.lanes or cfg.parallel.micro_batch_lanes
    segments = args.segments or cfg.data.n_segments
    update = args.update or model.update
    half = cfg.performance.half_memory_products and not args.fp32_products
    shape = (
        f"b={lanes} h={h} g={g} d={d} segments={segments}x{n}, bf16, {'bf16' if half else 'fp32'} products, "
        f"{'learned' if args.learned_scales else 'fixed'} scales, {torch.cuda.get_device_name()}"
    )

    def eager_read(*xs):
        return (read_and_mix(*xs, half_products=half),)

    def fused_read(*xs):
        return (memory_read(*xs, half_products=half),)

    inputs, leaves = make_read_inputs(lanes, h, g, segments, n, d, args.learned_scales)
    variants = {"eager": eager_read, "torch.compile": torch.compile(eager_read), "fused (Triton)": fused_read}
    print_table(f"memory read + gate mix, fwd+bwd: {shape}", variants, inputs, leaves, args.iters)

    def eager_write(k, v, scale):
        operands = torch.bfloat16 if half else torch.float32
        sk = scaled_sigma(k, scale, operands).reshape(lanes, g, segments, n, d)
        values = v.to(operands).reshape(lanes, g, segments, n, d)
        M_before, z_before, final = _memories_before_segments(sk, values, None, None, update, torch.float32)
        return M_before, z_before, *final

    def fused_write(k, v, scale):
        M_before, z_before, final = memory_write(
            k, v, segment_length=n, update=update, key_scale=scale, half_products=half
        )
        return M_before, z_before, *final

    inputs, leaves = make_write_inputs(lanes, g, segments, n, d, args.learned_scales)
    variants = {"eager": eager_write, "torch.compile": torch.compile(eager_write), "fused (Triton)": fused_write}
    print()
    print_table(f"memory write ({update}), fwd+bwd: {shape}", variants, inputs, leaves, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
