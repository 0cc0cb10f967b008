"""The fused memory write (modeling/memory_kernels.py) against a float64 loop, and against the eager path.

With a GPU the kernels run compiled on it, and a bf16 check at a realistic shape compares them with
infini_attention's eager CUDA path. Without one they run under Triton's interpreter on CPU tensors, in a
fresh Python (tests/model/triton_interpreter.py).
"""

import pytest
import torch

from modeling.infini_attention import infini_attention
from tests.model.triton_interpreter import DEVICE, HALF_DTYPES, IN_PROCESS, in_process, run_under_interpreter
from tests.tolerance import assert_close

pytest.importorskip("triton")


@pytest.mark.skipif(IN_PROCESS, reason="the checks run in this process")
def test_under_the_triton_interpreter():
    run_under_interpreter(__file__)


from modeling import memory_kernels  # noqa: E402  (after the check that Triton is there)


def reference_write(k, v, M, z, key_scale, reset, segment_length, update):
    """The memory before each segment and after the last, in float64, one segment at a time: sigma(c k)
    written by the linear or the delta rule (whose read of an empty memory is 0), emptied where reset."""
    b, g, t, d = k.shape
    M_before, z_before = [], []
    for i in range(t // segment_length):
        if reset is not None:
            keep = (~reset[:, i]).double()
            M, z = M * keep.view(b, 1, 1, 1), z * keep.view(b, 1, 1)
        M_before.append(M)
        z_before.append(z)
        tokens = slice(i * segment_length, (i + 1) * segment_length)
        x = key_scale.view(1, g, 1, 1) * k[:, :, tokens]
        sk = torch.where(x > 0, x + 1.0, torch.exp(x))
        values = v[:, :, tokens]
        if update == "delta":
            numerator, denominator = sk @ M, sk @ z.unsqueeze(-1)
            safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
            values = values - torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))
        M = M + sk.transpose(-1, -2) @ values
        z = z + sk.sum(dim=2)
    return torch.stack(M_before, dim=2), torch.stack(z_before, dim=2), M, z


def make_write_inputs(b, g, s, n, d, dv, dtype, seed=0):
    """k, v in dtype; a given memory (M, z > 0) in float32; per-group key scales [g] around 1."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, g, s * n, d, generator=gen).to(dtype)
    v = torch.randn(b, g, s * n, dv, generator=gen).to(dtype)
    M = torch.randn(b, g, d, dv, generator=gen) * 4
    z = torch.rand(b, g, d, generator=gen) * 8 + 0.5
    key_scale = torch.rand(g, generator=gen) * 1.5 + 0.5
    return [x.to(DEVICE) for x in (k, v, M, z, key_scale)]


def write_probes(b, g, s, d, dv, seed=1):
    """Weights of a loss on each output (M_before, z_before, M, z), so that all their gradients flow."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in ((b, g, s, d, dv), (b, g, s, d), (b, g, d, dv), (b, g, d))]


def run_fused(inputs, probes, reset, n, update, given_memory=True, **settings):
    leaves = [x.clone().requires_grad_() for x in inputs]
    k, v, M, z, key_scale = leaves
    memory = (M, z) if given_memory else None
    M_before, z_before, final = memory_kernels.memory_write(
        k, v, memory, reset, segment_length=n, update=update, key_scale=key_scale, **settings
    )
    outputs = [M_before, z_before, *final]
    sum((x * p.to(x)).sum() for x, p in zip(outputs, probes)).backward()
    return [x.detach() for x in outputs] + [k.grad, v.grad, key_scale.grad] + [M.grad, z.grad] * given_memory


def run_reference(inputs, probes, reset, n, update, given_memory=True):
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    k, v, M, z, key_scale = leaves
    if not given_memory:
        M, z = torch.zeros_like(M), torch.zeros_like(z)
    outputs = reference_write(k, v, M, z, key_scale, reset if reset is None else reset.cpu(), n, update)
    sum((x * p.double()).sum() for x, p in zip(outputs, probes)).backward()
    return [x.detach() for x in outputs] + [k.grad, v.grad, key_scale.grad] + [M.grad, z.grad] * given_memory


NAMES = ("M_before", "z_before", "M", "z", "dk", "dv", "dkey_scale", "dM0", "dz0")
RESETS = [[False, True, False], [True, False, True]]  # a reset in the middle, and one before the first segment
WRITE_CASES = {
    "given-memory-resets": dict(),
    "empty-memory": dict(reset=None, given_memory=False),
    # Two tiles of the memory each way (partly masked; the delta rule keeps whole rows of d), and two backward
    # chunks a segment, the second one partly masked.
    "tiled-chunked": dict(d=32, dv=24, n=40, block=16, chunks=2),
    # Segments longer than a block of tokens: the forward sums two blocks a segment (the second partly masked),
    # the backward three in one chunk.
    "long-segments": dict(n=80),
}


@in_process
@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_float32_write_matches_float64_loop(case, update):
    shape = dict(b=2, g=2, s=3, n=20, d=16, dv=8, reset=RESETS, given_memory=True) | WRITE_CASES[case]
    settings = {key: shape.pop(key) for key in ("block", "chunks") if key in shape}
    reset, given_memory = shape.pop("reset"), shape.pop("given_memory")
    reset = reset if reset is None else torch.tensor(reset, device=DEVICE)
    b, g, s, n, d, dv = (shape[key] for key in ("b", "g", "s", "n", "d", "dv"))
    inputs = make_write_inputs(b, g, s, n, d, dv, torch.float32)
    probes = write_probes(b, g, s, d, dv)
    got = run_fused(inputs, probes, reset, n, update, given_memory, **settings)
    want = run_reference(inputs, probes, reset, n, update, given_memory)
    # Forward: sums over a row's tokens (with the delta rule after reads summed over d); backward: sums over
    # the segments' probes carried back, the tokens, d and dv, after the forward's sums.
    tokens = b * s * n
    for name, x, w in zip(NAMES, got, want):
        forward = name in NAMES[:4]
        assert_close(x.cpu(), w, torch.float32, tokens, depth=2 if forward else 4, what=name)


@in_process
@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("half_products", [False, True], ids=["fp32-products", "half-products"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_inputs_match_float64_loop_within_their_rounding(dtype, half_products, update):
    b, g, s, n, d, dv = 2, 2, 3, 16, 16, 16
    inputs = make_write_inputs(b, g, s, n, d, dv, dtype)
    probes = write_probes(b, g, s, d, dv)
    reset = torch.tensor(RESETS, device=DEVICE)
    got = run_fused(inputs, probes, reset, n, update, half_products=half_products)
    want = run_reference(inputs, probes, reset, n, update)
    # The memory sums in float32; half products round sigma(k) (with the delta rule also the memory, z and
    # v - read, and backward M's gradient) once each on the way, and the gradients of k and v round to dtype.
    depth = 4 if half_products else 2
    for name, x, w in zip(NAMES, got, want):
        assert_close(x.cpu(), w, dtype, 1, depth=depth, what=name)


@in_process
def test_compiles_as_one_graph_with_the_same_values_and_gradients():
    """A compiled layer must keep the fused write whole: fullgraph=True fails on any graph break."""
    b, g, s, n, d, dv = 2, 2, 3, 20, 16, 8
    inputs = make_write_inputs(b, g, s, n, d, dv, torch.float32)
    reset = torch.tensor(RESETS, device=DEVICE)

    def write_then_use(k, v, M, z, key_scale):
        M_before, z_before, (M, z) = memory_kernels.memory_write(
            k * 1.5, v, (M, z), reset, segment_length=n, update="delta", key_scale=key_scale
        )
        return M_before.tanh().sum() + z_before.square().sum() + M.sum() + z.sum()

    compiled = torch.compile(write_then_use, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (write_then_use, compiled):
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [x.grad for x in leaves])
    for name, x, w in zip(("loss", "dk", "dv", "dM", "dz", "dkey_scale"), *results):
        torch.testing.assert_close(x, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@in_process
def test_core_attention_module_passes_the_fused_write_setting():
    from megatron.core.transformer.enums import AttnMaskType

    from modeling.config import ModelConfig, build_transformer_config
    from modeling.layers import InfiniCoreAttention

    h, g, n = 4, 2, 16
    config = build_transformer_config(
        ModelConfig(num_attention_heads=h, num_query_groups=g, segment_length=n), infini_fused_memory_write=True
    )
    module = InfiniCoreAttention(config, 1, AttnMaskType.causal, "self").to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, heads, 3 * n, 16, generator=gen).to(DEVICE) for heads in (h, g, g))
    got, (M, _) = module(q, k, v)
    _, (fused, _) = infini_attention(q, k, v, module.gate, segment_length=n, fused_memory_write=True)
    _, (eager, _) = infini_attention(q, k, v, module.gate, segment_length=n)
    assert torch.equal(M, fused) and not torch.equal(M, eager)


@in_process
def test_refuses_what_it_cannot_run():
    k, v, M, z, key_scale = make_write_inputs(1, 1, 1, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="fused memory write takes .*float64"):
        memory_kernels.memory_write(k.double(), v.double(), segment_length=16)
    with pytest.raises(ValueError, match="update rule"):
        memory_kernels.memory_write(k, v, segment_length=16, update="gated")


@pytest.mark.gpu
@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("half_products", [False, True], ids=["fp32-products", "bf16-products"])
def test_fused_matches_eager_cuda_in_bf16(update, head_dim, half_products):
    b, h, g, n, s = 2, 16, 4, 512, 4
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(b, heads, s * n, head_dim, generator=gen) for heads in (h, g, g))
    gate = torch.randn(h, generator=gen)
    key_scale = torch.rand(g, generator=gen) + 0.5
    reset = torch.zeros(b, s, dtype=torch.bool, device=DEVICE)
    reset[1, 2] = True
    out_grad = torch.randn(b, h, s * n, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    memory_grads = [torch.randn(b, g, head_dim, head_dim, generator=gen), torch.randn(b, g, head_dim, generator=gen)]
    results = []
    for fused in (False, True):
        leaves = [x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (q, k, v)]
        leaves += [x.to(DEVICE).requires_grad_() for x in (gate, key_scale)]
        out, (M, z) = infini_attention(
            *leaves[:4],
            segment_length=n,
            update=update,
            reset=reset,
            half_memory_products=half_products,
            memory_key_scale=leaves[4],
            fused_memory_write=fused,
        )
        loss = (out * out_grad).sum() + sum((x * p.to(DEVICE)).sum() for x, p in zip((M, z), memory_grads))
        loss.backward()
        results.append([out.detach(), M.detach(), z.detach()] + [x.grad for x in leaves])
    # Both sum the memory in float32: they differ by their bf16 roundings (the output, and on the way the
    # half products' operands, and the eager path's bf16 writes and gradients), a handful in sequence.
    names = ("out", "M", "z", "dq", "dk", "dv", "dgate", "dkey_scale")
    for name, eager, fused in zip(names, *results):
        assert_close(fused, eager, torch.bfloat16, 1, depth=8, what=name)
