"""Infini-attention on the GPU against the float64 reference, per SDPA backend: is the fast path right?

The CPU tests check the math backend only; on a GPU the local attention runs on cuDNN (or flash, or
memory-efficient) SDPA over strided views of megatron's [s, b, h, d] activations. For each backend,
dtype and memory update, the output and the gradients of q, k, v and the gates are compared with
tests/model/reference.py in float64 (relative error: max |diff| / max |reference|), with inputs laid
out as InfiniSelfAttention passes them (permuted, not contiguous) and a reset in one row. In bf16 both
with the memory's matmuls on float32 operands (the default) and on bf16 ones
(``performance.half_memory_products``).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend

from modeling import infini_attention as ia
from tests.model.reference import reference_infini_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Several units of the last place of the compute dtype (float32: 2^-24, bf16: 2^-8), with room for the
# reductions over a 64-token segment, 64 head dimensions and four segments of memory.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
BATCH, HEADS, SEGMENTS, SEGMENT, HEAD_DIM = 3, 4, 4, 64, 64


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    b, h, n, d, s = BATCH, HEADS, SEGMENT, HEAD_DIM, SEGMENTS
    t = s * n
    # megatron's layout [t, b, h, d], permuted to [b, h, t, d] as InfiniSelfAttention does.
    q, k, v = (torch.randn(t, b, h, d, dtype=torch.float64) for _ in range(3))
    gate = torch.randn(h, dtype=torch.float64)
    angles = torch.outer(
        torch.arange(n, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    )
    rope = torch.cat([angles, angles], dim=-1).view(n, 1, 1, d)
    reset = torch.zeros(b, s, dtype=torch.bool)
    reset[1, s // 2] = True
    out_grad = torch.randn(b, h, t, d, dtype=torch.float64)
    return dict(q=q, k=k, v=v, gate=gate, rope=rope, reset=reset, out_grad=out_grad)


@pytest.fixture(scope="module")
def references(inputs):
    out = {}
    for update in ("linear", "delta"):
        leaves = [inputs[x].permute(1, 2, 0, 3).clone().requires_grad_() for x in "qkv"]
        leaves.append(inputs["gate"].clone().requires_grad_())
        ref_out, _ = reference_infini_attention(
            *leaves, segment_length=SEGMENT, update=update, reset=inputs["reset"], rotary_pos_emb=inputs["rope"]
        )
        ref_out.backward(inputs["out_grad"])
        out[update] = [ref_out.detach()] + [x.grad for x in leaves]
    return out


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "dtype,half_products",
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16", "bf16-half-products"],
)
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_matches_the_float64_reference(inputs, references, update, dtype, half_products, backend, monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setattr(ia, "_CUDA_SDPA_PRIORITY", [BACKENDS[backend]])
    xs = [inputs[x].to(dev, dtype).requires_grad_() for x in "qkv"]
    gate = inputs["gate"].to(dev, torch.float32).requires_grad_()
    try:
        out, _ = ia.infini_attention(
            *(x.permute(1, 2, 0, 3) for x in xs),
            gate,
            segment_length=SEGMENT,
            update=update,
            reset=inputs["reset"].to(dev),
            rotary_pos_emb=inputs["rope"].to(dev),
            half_memory_products=half_products,
        )
        out.backward(inputs["out_grad"].to(dev, out.dtype))
    except RuntimeError as error:
        pytest.skip(f"{backend} SDPA is not available for {dtype}: {str(error).splitlines()[0][:80]}")
    got = [out.detach()] + [x.grad.permute(1, 2, 0, 3) for x in xs] + [gate.grad]
    errors = {
        name: relative_error(x, w) for name, x, w in zip(("output", "dq", "dk", "dv", "dgate"), got, references[update])
    }
    assert max(errors.values()) < TOLERANCE[dtype], errors
