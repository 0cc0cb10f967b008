"""Infini-attention on the GPU against the float64 reference, per SDPA backend: is the fast path right?

    python bench/gpu_numerics.py [--segments 4] [--segment-length 64] [--batch 3]

The CPU tests check the math backend only; on a GPU the local attention runs on cuDNN (or flash, or
memory-efficient) SDPA over strided views of megatron's [s, b, h, d] activations. For each backend
and dtype this prints the relative error (max |diff| / max |reference|) of the output and of the
gradients of q, k, v and the gates against tests/model/reference.py in float64, with inputs laid
out as InfiniSelfAttention passes them (permuted, not contiguous) and with a reset in one row. In
bf16 it does so twice: with the memory's matmuls on float32 operands (the default) and on bf16 ones
(`performance.half_memory_products`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from modeling import infini_attention as ia  # noqa: E402
from tests.model.reference import reference_infini_attention  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--segment-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (every backend is math there)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    dev = torch.device(a.device)
    torch.manual_seed(0)
    b, h, n, d, s = a.batch, a.heads, a.segment_length, a.head_dim, a.segments
    t = s * n
    # megatron's layout [t, b, h, d], permuted to [b, h, t, d] as InfiniSelfAttention does.
    q, k, v = (torch.randn(t, b, h, d, dtype=torch.float64) for _ in range(3))
    gate = torch.randn(h, dtype=torch.float64)
    angles = torch.outer(torch.arange(n, dtype=torch.float32),
                         1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rope = torch.cat([angles, angles], dim=-1).view(n, 1, 1, d)
    reset = torch.zeros(b, s, dtype=torch.bool)
    reset[1, s // 2] = True
    out_grad = torch.randn(b, h, t, d, dtype=torch.float64)
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{card}, torch {torch.__version__}; b={b} h={h} segments={s}x{n} d={d}")
    print("| update | dtype | memory products | SDPA backend | output | dq | dk | dv | dgate |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for update in ("linear", "delta"):
        leaves = [x.permute(1, 2, 0, 3).clone().requires_grad_() for x in (q, k, v)] + [gate.clone().requires_grad_()]
        ref_out, _ = reference_infini_attention(*leaves, segment_length=n, update=update, reset=reset,
                                                rotary_pos_emb=rope)
        ref_out.backward(out_grad)
        want = [ref_out.detach()] + [x.grad for x in leaves]
        for dtype, half_products in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            dtype_name = str(dtype).replace("torch.", "")
            products = dtype_name if half_products else "float32"
            for name, backend in BACKENDS.items():
                ia._CUDA_SDPA_PRIORITY = [backend]
                xs = [x.to(dev, dtype).requires_grad_() for x in (q, k, v)]
                g = gate.to(dev, torch.float32).requires_grad_()
                try:
                    out, _ = ia.infini_attention(*(x.permute(1, 2, 0, 3) for x in xs), g, segment_length=n,
                                                 update=update, reset=reset.to(dev), rotary_pos_emb=rope.to(dev),
                                                 half_memory_products=half_products)
                    out.backward(out_grad.to(dev, out.dtype))
                except RuntimeError as error:
                    print(f"| {update} | {dtype_name} | {products} | {name} | not available: {str(error).splitlines()[0][:60]} |")
                    continue
                got = [out.detach()] + [x.grad.permute(1, 2, 0, 3) for x in xs] + [g.grad]
                errors = " | ".join(f"{relative_error(x, w):.1e}" for x, w in zip(got, want))
                print(f"| {update} | {dtype_name} | {products} | {name} | {errors} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
