"""The fused memory read (modeling/memory_kernels.py) against a float64 loop, and against the eager path.

With a GPU the kernels run compiled on it, and a bf16 check at a realistic shape compares them with
infini_attention's eager CUDA path. Without one they run under Triton's interpreter on CPU tensors, in a
fresh Python (tests/model/triton_interpreter.py).
"""

import sys

import pytest
import torch

from modeling.infini_attention import infini_attention
from tests.model.reference import reference_infini_attention
from tests.model.triton_interpreter import DEVICE, HALF_DTYPES, IN_PROCESS, in_process, run_under_interpreter
from tests.tolerance import assert_close

pytest.importorskip("triton")


@pytest.mark.skipif(IN_PROCESS, reason="the checks run in this process")
def test_under_the_triton_interpreter():
    run_under_interpreter(__file__)


from modeling import memory_kernels  # noqa: E402  (after the check that Triton is there)


def reference_read(q, local, M, z, gate, query_scale):
    """out = w sigma(c q) M / (sigma(c q) z) + (1 - w) local, w = sigmoid(gate), in float64, one segment
    and query head at a time; a read with denominator 0 is 0."""
    b, h, t, d = q.shape
    g, s = M.shape[1], M.shape[2]
    n, group = t // s, h // g
    rows = []
    for head in range(h):
        segments = []
        for i in range(s):
            x = query_scale[head] * q[:, head, i * n : (i + 1) * n]
            sq = torch.where(x > 0, x + 1.0, torch.exp(x))
            numerator = sq @ M[:, head // group, i]
            denominator = sq @ z[:, head // group, i].unsqueeze(-1)
            safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
            read = torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))
            w = torch.sigmoid(gate[head])
            segments.append(w * read + (1 - w) * local[:, head, i * n : (i + 1) * n])
        rows.append(torch.cat(segments, dim=1))
    return torch.stack(rows, dim=1)


def make_read_inputs(b, h, g, s, n, d, dv, dtype, seed=0, empty_first=True):
    """q, local in dtype; memories in float32 as sums of sigma(k)^T v would be (z > 0, or 0 where empty);
    gate [h]; per-head query scales [h] around 1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s * n, d, generator=gen).to(dtype)
    local = torch.randn(b, h, s * n, dv, generator=gen).to(dtype)
    M = torch.randn(b, g, s, d, dv, generator=gen) * 4
    z = torch.rand(b, g, s, d, generator=gen) * 8 + 0.5
    if empty_first:  # the memory before the first segment of a sequence
        M[:, :, 0], z[:, :, 0] = 0.0, 0.0
    gate = torch.randn(h, generator=gen)
    scale = torch.rand(h, generator=gen) * 1.5 + 0.5
    return [x.to(DEVICE) for x in (q, local, M, z, gate, scale)]


def run_fused(inputs, out_grad, half_products=False, chunks=None):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = memory_kernels.memory_read(*leaves, half_products=half_products, chunks=chunks)
    out.backward(out_grad.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def run_reference(inputs, out_grad):
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    out = reference_read(*leaves)
    out.backward(out_grad.cpu().double())
    return [out.detach()] + [x.grad for x in leaves]


NAMES = ("out", "dq", "dlocal", "dM", "dz", "dgate", "dscale")
READ_CASES = {
    "mha": dict(h=2, g=2),
    "gqa": dict(h=4, g=2),
    "gqa-chunked": dict(h=4, g=1, n=80, chunks=2),  # two chunks per segment, the second one partly masked
}


@in_process
@pytest.mark.parametrize("case", list(READ_CASES))
def test_float32_read_matches_float64_loop(case):
    shape = dict(b=2, s=3, n=20, d=16, dv=8) | READ_CASES[case]
    chunks = shape.pop("chunks", None)
    inputs = make_read_inputs(**shape, dtype=torch.float32)
    out_grad = torch.randn(shape["b"], shape["h"], shape["s"] * shape["n"], shape["dv"], device=DEVICE)
    got = run_fused(inputs, out_grad, chunks=chunks)
    want = run_reference(inputs, out_grad)
    # Forward: sums over d; backward: the memory's gradients sum over a segment's tokens of every head of
    # a group, the gate's and scale's over all tokens, after the forward's sums.
    tokens = shape["n"] * shape["s"] * shape["b"]
    for name, x, w in zip(NAMES, got, want):
        size = shape["d"] if name == "out" else max(shape["d"], tokens * shape["h"] // shape["g"])
        assert_close(x.cpu(), w, torch.float32, size, depth=1 if name == "out" else 3, what=name)


@in_process
def test_compiles_as_one_graph_with_the_same_values_and_gradients():
    """A compiled layer must keep the fused read whole: fullgraph=True fails on any graph break."""
    shape = dict(b=2, h=4, g=2, s=3, n=20, d=16, dv=8)
    inputs = make_read_inputs(**shape, dtype=torch.float32)
    out_grad = torch.randn(shape["b"], shape["h"], shape["s"] * shape["n"], shape["dv"], device=DEVICE)

    def mix_after_read(q, local, M, z, gate, scale):
        return memory_kernels.memory_read(q * 1.5, local, M, z, gate, scale).tanh()

    compiled = torch.compile(mix_after_read, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (mix_after_read, compiled):
        leaves = [x.clone().requires_grad_() for x in inputs]
        fn(*leaves).backward(out_grad)
        results.append([fn(*leaves).detach()] + [x.grad for x in leaves])
    for name, x, w in zip(NAMES, *results):
        torch.testing.assert_close(x, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@in_process
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("half_products", [False, True], ids=["fp32-products", "half-products"])
def test_half_inputs_match_float64_loop_within_their_rounding(dtype, half_products):
    b, h, g, s, n, d, dv = 2, 4, 2, 3, 16, 16, 16
    inputs = make_read_inputs(b, h, g, s, n, d, dv, dtype)
    out_grad = torch.randn(b, h, s * n, dv, device=DEVICE).to(dtype)
    got = run_fused(inputs, out_grad, half_products=half_products)
    want = run_reference(inputs, out_grad)
    # The output rounds once to dtype; half products also round sigma(q), M and z (and, backward, the
    # numerator's gradient) on the way: a few roundings in sequence, each outweighing the float32 sums.
    depth = 4 if half_products else 2
    for name, x, w in zip(NAMES, got, want):
        assert_close(x.cpu(), w, dtype, 1, depth=depth, what=name)


@in_process
def test_empty_memory_reads_zeros_with_finite_gradients():
    b, h, g, s, n, d, dv = 1, 2, 1, 2, 16, 16, 16
    q, local, M, z, gate, scale = make_read_inputs(b, h, g, s, n, d, dv, torch.float32)
    z = torch.zeros_like(z)  # M is left as it is: with z = 0 nothing is read from it, whatever it holds
    out_grad = torch.randn(b, h, s * n, dv, device=DEVICE)
    out, dq, dlocal, dM, dz, dgate, dscale = run_fused([q, local, M, z, gate, scale], out_grad)
    w = torch.sigmoid(gate).view(1, h, 1, 1)
    assert_close(out.cpu(), ((1 - w) * local).cpu(), torch.float32, 1, what="out")
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dscale, torch.zeros_like(dscale))
    for grad in (dlocal, dM, dz, dgate):
        assert torch.isfinite(grad).all()
    # The read is the constant 0 there: nothing flows back into the memory.
    assert torch.equal(dM, torch.zeros_like(dM)) and torch.equal(dz, torch.zeros_like(dz))
    assert_close(dgate.cpu(), (-(out_grad * local).sum((0, 2, 3)) * (w * (1 - w)).view(h)).cpu(), torch.float32, n * s)


@in_process
@pytest.mark.parametrize("fused_write", [False, True], ids=["read", "read_and_write"])
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_infini_attention_with_fused_kernels_matches_float64_reference(update, fused_write):
    # GQA, learned-style per-head scales, a given memory and a reset: the whole layer core with the fused
    # read (and write), values and the gradients of every input.
    b, h, g, n, s, d = 2, 4, 2, 16, 3, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, heads, s * n, d, generator=gen) for heads in (h, g, g))
    gate = torch.randn(h, generator=gen)
    key_scale, query_scale = torch.rand(g, generator=gen) + 0.5, torch.rand(h, generator=gen) + 0.5
    memory = (torch.randn(b, g, d, d, generator=gen), torch.rand(b, g, d, generator=gen) * 3)
    reset = torch.tensor([[False, True, False], [False, False, False]])
    inputs = [q, k, v, gate, key_scale, query_scale, *memory]
    leaves = [x.to(DEVICE, copy=True).requires_grad_() for x in inputs]
    ref_leaves = [x.double().requires_grad_() for x in inputs]

    def call(fn, xs, **kwargs):
        return fn(
            *xs[:4],
            (xs[6], xs[7]),
            segment_length=n,
            update=update,
            reset=reset.to(xs[0].device),
            memory_key_scale=xs[4],
            memory_query_scale=xs[5],
            **kwargs,
        )

    out, (M, z) = call(infini_attention, leaves, fused_memory_read=True, fused_memory_write=fused_write)
    ref_out, (ref_M, ref_z) = call(reference_infini_attention, ref_leaves)
    probe = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    (out * probe.to(out)).sum().add(M.sum() * 0.3 + z.sum() * 0.1).backward()
    (ref_out * probe).sum().add(ref_M.sum() * 0.3 + ref_z.sum() * 0.1).backward()
    assert_close(out.detach().cpu(), ref_out.detach(), torch.float32, s * n, depth=2, what="out")
    assert_close(M.detach().cpu(), ref_M.detach(), torch.float32, s * n, depth=2, what="M")
    assert_close(z.detach().cpu(), ref_z.detach(), torch.float32, s * n, depth=2, what="z")
    names = ("q", "k", "v", "gate", "key_scale", "query_scale", "M", "z")
    for name, x, w in zip(names, leaves, ref_leaves):
        assert_close(x.grad.cpu(), w.grad, torch.float32, b * s * n, depth=4, what=f"d{name}")


@in_process
def test_core_attention_module_passes_the_fused_read_setting():
    from megatron.core.transformer.enums import AttnMaskType

    from modeling.config import ModelConfig, build_transformer_config
    from modeling.layers import InfiniCoreAttention

    h, g, n = 4, 2, 16
    config = build_transformer_config(
        ModelConfig(num_attention_heads=h, num_query_groups=g, segment_length=n), infini_fused_memory_read=True
    )
    module = InfiniCoreAttention(config, 1, AttnMaskType.causal, "self").to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, heads, 3 * n, 16, generator=gen).to(DEVICE) for heads in (h, g, g))
    got, _ = module(q, k, v)
    fused, _ = infini_attention(q, k, v, module.gate, segment_length=n, fused_memory_read=True)
    eager, _ = infini_attention(q, k, v, module.gate, segment_length=n)
    assert torch.equal(got, fused) and not torch.equal(got, eager)


@in_process
def test_refuses_what_it_cannot_run(monkeypatch):
    q, local, M, z, gate, scale = make_read_inputs(1, 2, 1, 1, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        memory_kernels.memory_read(q.double(), local, M, z, gate, scale)
    monkeypatch.setattr(memory_kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA"):
        memory_kernels.memory_read(q.cpu(), local.cpu(), M.cpu(), z.cpu(), gate.cpu(), scale.cpu())


@in_process
def test_infini_attention_names_the_missing_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "modeling.memory_kernels")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ModuleNotFoundError, match="need Triton"):
        infini_attention(q, q, q, torch.zeros(2), segment_length=8, fused_memory_read=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("groups", [16, 4])
@pytest.mark.parametrize("half_products", [False, True], ids=["fp32-products", "bf16-products"])
def test_fused_matches_eager_cuda_in_bf16(groups, head_dim, half_products):
    b, h, n, s = 2, 16, 512, 4
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(b, heads, s * n, head_dim, generator=gen) for heads in (h, groups, groups))
    gate = torch.randn(h, generator=gen)
    query_scale = torch.rand(h, generator=gen) + 0.5
    out_grad = torch.randn(b, h, s * n, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    results = []
    for fused in (False, True):
        leaves = [x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (q, k, v)]
        leaves += [x.to(DEVICE).requires_grad_() for x in (gate, query_scale)]
        out, (M, z) = infini_attention(
            *leaves[:4],
            segment_length=n,
            half_memory_products=half_products,
            memory_query_scale=leaves[4],
            fused_memory_read=fused,
        )
        out.backward(out_grad)
        results.append([out.detach()] + [x.grad for x in leaves])
    # Both sum in float32: they differ by their bf16 roundings (the output, and on the way the half
    # products' operands and the eager path's bf16 sigma and gradients), a handful in sequence.
    for name, eager, fused in zip(("out", "dq", "dk", "dv", "dgate", "dscale"), *results):
        assert_close(fused, eager, torch.bfloat16, 1, depth=8, what=name)
