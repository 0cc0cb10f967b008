import pytest
import torch

from modeling.infini_attention import infini_attention
from tests.model.reference import reference_infini_attention
from tests.tolerance import assert_close, tolerance

B, H, G, D, DV, N = 2, 4, 2, 8, 6, 5


def make_inputs(n_segments, heads=H, groups=G, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    t = n_segments * N
    q = (torch.randn(B, heads, t, D, generator=gen) * scale).to(dtype)
    k = (torch.randn(B, groups, t, D, generator=gen) * scale).to(dtype)
    v = (torch.randn(B, groups, t, DV, generator=gen) * scale).to(dtype)
    gate = torch.randn(heads, generator=gen).to(dtype)
    return q, k, v, gate


def make_memory(groups=G, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, groups, D, DV, generator=gen), torch.rand(B, groups, D, generator=gen) * 3


def rope_angles(n=N, dim=D):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(n).float(), inv)
    return torch.cat([freqs, freqs], dim=-1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    dict(update="linear"),
    dict(update="delta"),
    dict(update="linear", memory=True),
    dict(update="delta", memory=True),
    dict(update="linear", memory=True, reset=True),
    dict(update="delta", memory=True, reset=True),
    dict(update="linear", rope=True, reset=True),
    dict(update="delta", rope=True, groups=H),
    dict(update="linear", memory=True, key_scale=2.5),
    dict(update="delta", memory=True, key_scale=0.5, query_scale=1.5),
    dict(update="linear", memory=True, query_scale=2.0),
    dict(update="linear", memory=True, reset=True, per_head_scales=True),
    dict(update="delta", memory=True, rope=True, per_head_scales=True),
    dict(update="delta", groups=H, per_head_scales=True),
]


def per_head_scales(groups, heads=H, seed=2):
    """Positive key scales [groups] and query scales [heads] spread around 1, as learned ones would be."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(groups, generator=gen) * 2.5 + 0.25), (torch.rand(heads, generator=gen) * 2.5 + 0.25)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_float64_reference_values_and_gradients(case):
    groups = case.get("groups", G)
    q, k, v, gate = make_inputs(4, groups=groups)
    memory = make_memory(groups) if case.get("memory") else None
    reset = torch.tensor([[False, False, True, False], [True, False, False, True]]) if case.get("reset") else None
    rope = rope_angles() if case.get("rope") else None
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    mem_in = tuple(m.clone().requires_grad_() for m in memory) if memory else None
    ref_inputs = [x.double().clone().requires_grad_() for x in (q, k, v, gate)]
    if case.get("per_head_scales"):
        # The scales are inputs too: their gradients are checked with the others'.
        names = ("memory_key_scale", "memory_query_scale")
        inputs += [s.clone().requires_grad_() for s in per_head_scales(groups)]
        ref_inputs += [s.double().requires_grad_() for s in per_head_scales(groups)]
        scales, ref_scales = dict(zip(names, inputs[4:])), dict(zip(names, ref_inputs[4:]))
    else:
        scales = ref_scales = dict(
            memory_key_scale=case.get("key_scale", 1.0), memory_query_scale=case.get("query_scale", 1.0)
        )
    out, (M, z) = infini_attention(
        *inputs[:4], mem_in, segment_length=N, update=case["update"], reset=reset, rotary_pos_emb=rope, **scales
    )
    ref_mem = tuple(m.double().clone().requires_grad_() for m in memory) if memory else None
    ref_out, (ref_M, ref_z) = reference_infini_attention(
        *ref_inputs[:4],
        ref_mem,
        segment_length=N,
        update=case["update"],
        reset=reset,
        rotary_pos_emb=rope,
        **ref_scales,
    )
    assert M.dtype == torch.float32 and z.dtype == torch.float32
    # float32 against float64: all tokens summed into the memory, then read (forward), and back (gradients).
    forward = tolerance(torch.float32, q.shape[2], depth=2)
    assert rel_err(out, ref_out) < forward
    assert rel_err(M, ref_M) < forward and rel_err(z, ref_z) < forward

    probe = torch.randn_like(ref_out)
    (ref_out * probe).sum().add((ref_M * 0.3).sum() + ref_z.sum() * 0.1).backward()
    (out * probe.float()).sum().add((M * 0.3).sum() + z.sum() * 0.1).backward()
    backward = tolerance(torch.float32, q.shape[2], depth=4)
    for got, want in zip(inputs, ref_inputs):
        assert rel_err(got.grad, want.grad) < backward
    if memory:
        for got, want in zip(mem_in, ref_mem):
            assert rel_err(got.grad, want.grad) < backward


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_gradcheck_float64(update):
    q, k, v, gate = (x.double().requires_grad_() for x in make_inputs(3))
    M, z = (m.double().requires_grad_() for m in make_memory())
    reset = torch.tensor([[False, True, False], [False, False, False]])

    def fn(q, k, v, gate, M, z):
        out, memory = infini_attention(q, k, v, gate, (M, z), segment_length=N, update=update, reset=reset)
        return out, memory.M, memory.z

    assert torch.autograd.gradcheck(fn, (q, k, v, gate, M, z), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_gradcheck_float64_with_per_head_scales(update):
    q, k, v, gate = (x.double().requires_grad_() for x in make_inputs(3))
    M, z = (m.double().requires_grad_() for m in make_memory())
    key_scale, query_scale = (s.double().requires_grad_() for s in per_head_scales(G))
    reset = torch.tensor([[False, True, False], [False, False, False]])

    def fn(q, k, v, gate, M, z, key_scale, query_scale):
        out, memory = infini_attention(
            q,
            k,
            v,
            gate,
            (M, z),
            segment_length=N,
            update=update,
            reset=reset,
            memory_key_scale=key_scale,
            memory_query_scale=query_scale,
        )
        return out, memory.M, memory.z

    assert torch.autograd.gradcheck(
        fn, (q, k, v, gate, M, z, key_scale, query_scale), eps=1e-6, atol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_carrying_memory_across_calls_equals_one_call(update):
    q, k, v, gate = make_inputs(8)
    whole, mem_whole = infini_attention(q, k, v, gate, segment_length=N, update=update)
    half = 4 * N
    first, mem = infini_attention(q[:, :, :half], k[:, :, :half], v[:, :, :half], gate, segment_length=N, update=update)
    second, mem_split = infini_attention(
        q[:, :, half:], k[:, :, half:], v[:, :, half:], gate, mem, segment_length=N, update=update
    )
    tokens = q.shape[2]
    assert_close(torch.cat([first, second], dim=2), whole, torch.float32, tokens, depth=2)
    assert_close(mem_split.M, mem_whole.M, torch.float32, tokens)
    assert_close(mem_split.z, mem_whole.z, torch.float32, tokens)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_reset_equals_fresh_call_from_that_segment(update):
    q, k, v, gate = make_inputs(6)
    s = 3
    reset = torch.zeros(B, 6, dtype=torch.bool)
    reset[:, s] = True
    out, mem = infini_attention(q, k, v, gate, make_memory(), segment_length=N, update=update, reset=reset)
    tail = slice(s * N, None)
    fresh, fresh_mem = infini_attention(
        q[:, :, tail], k[:, :, tail], v[:, :, tail], gate, segment_length=N, update=update
    )
    tokens = q.shape[2]
    assert_close(out[:, :, tail], fresh, torch.float32, tokens, depth=2)
    assert_close(mem.M, fresh_mem.M, torch.float32, tokens)


def test_reset_only_touches_its_row():
    q, k, v, gate = make_inputs(4)
    reset = torch.tensor([[False, False, True, False], [False, False, False, False]])
    with_reset, _ = infini_attention(q, k, v, gate, make_memory(), segment_length=N, reset=reset)
    without, _ = infini_attention(q, k, v, gate, make_memory(), segment_length=N)
    # The same kernels on the same shapes: the other row's reset cannot change this row's rounding.
    assert torch.equal(with_reset[1], without[1])
    assert not torch.allclose(with_reset[0, :, 2 * N :], without[0, :, 2 * N :])


def block_local_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    pos = torch.arange(t)
    allowed = (pos[:, None] >= pos[None, :]) & (pos[:, None] // N == pos[None, :] // N)
    scores = (q @ k.transpose(-1, -2)) / D**0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def test_gate_to_minus_infinity_is_block_local_causal_attention():
    q, k, v, _ = make_inputs(4)
    out, _ = infini_attention(q, k, v, torch.full((H,), -1e4), make_memory(), segment_length=N)
    assert_close(out, block_local_causal(q, k, v), torch.float32, max(D, N), depth=2)


def test_gate_to_plus_infinity_reads_zeros_from_an_empty_memory():
    q, k, v, _ = make_inputs(3)
    out, _ = infini_attention(q, k, v, torch.full((H,), 1e4), segment_length=N)
    assert torch.equal(out[:, :, :N], torch.zeros_like(out[:, :, :N]))
    assert out[:, :, N:].abs().sum() > 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("half_products", [False, True], ids=["fp32-products", "bf16-products"])
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_bf16_inputs_keep_float32_memory_without_overflow(update, half_products):
    # 1,000 segments of large activations: the memory's sums outgrow bf16's 8-bit mantissa (and fp16's
    # range); in float32 they stay finite and match a float64 closed form. With bf16 products only
    # each segment's update is rounded (2^-9), not the running sums.
    n_segments = 1000
    q, k, v, gate = make_inputs(n_segments, dtype=torch.bfloat16, scale=30.0)
    out, memory = infini_attention(q, k, v, gate, segment_length=N, update=update, half_memory_products=half_products)
    assert out.dtype == torch.bfloat16
    assert memory.M.dtype == torch.float32 and memory.z.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(memory.M).all() and torch.isfinite(memory.z).all()
    sk = torch.nn.functional.elu(k.double()) + 1
    if half_products:  # each segment's update rounded once to bf16, then summed in float32
        bound = tolerance(torch.bfloat16, 1)
    else:
        bound = tolerance(torch.float32, n_segments * N)
    assert rel_err(memory.z, sk.sum(dim=2)) < bound
    if update == "linear":
        assert rel_err(memory.M, sk.transpose(-1, -2) @ v.double()) < bound


@pytest.mark.parametrize("half_products", [False, True], ids=["fp32-products", "bf16-products"])
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_bf16_inputs_match_float64_reference_within_bf16_rounding(update, half_products):
    q, k, v, gate = make_inputs(8)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    mem_in = tuple(m.clone().requires_grad_() for m in make_memory())
    out, (M, z) = infini_attention(*inputs, mem_in, segment_length=N, update=update, half_memory_products=half_products)
    ref_inputs = [x.double().clone().requires_grad_() for x in (q, k, v, gate)]
    ref_mem = tuple(m.detach().double().requires_grad_() for m in mem_in)
    ref_out, (ref_M, ref_z) = reference_infini_attention(*ref_inputs, ref_mem, segment_length=N, update=update)
    assert M.dtype == torch.float32 and z.dtype == torch.float32
    # bf16 keeps 8 bits: the output's (and with bf16 products, each memory update's) one rounding to bf16
    # outweighs all float32 sums.
    once = tolerance(torch.bfloat16, 1)
    assert rel_err(out, ref_out) < once
    assert rel_err(M, ref_M) < once and rel_err(z, ref_z) < once
    probe = torch.randn_like(ref_out)
    (ref_out * probe).sum().add((ref_M * 0.3).sum() + ref_z.sum() * 0.1).backward()
    (out.float() * probe.float()).sum().add((M * 0.3).sum() + z.sum() * 0.1).backward()
    # Gradients: the output's rounding, the incoming gradient's and the input gradient's, in sequence.
    for got, want in zip(inputs + list(mem_in), ref_inputs + list(ref_mem)):
        assert rel_err(got.grad, want.grad) < tolerance(torch.bfloat16, 1, depth=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update="hebbian"), "hebbian"),
        (dict(segment_length=7), "\\(10\\) .* segment_length \\(7\\)"),
        (dict(segment_length=0), "segment_length \\(0\\)"),
        (dict(reset=torch.zeros(B, 3, dtype=torch.bool)), "\\(2, 2\\)"),
        (dict(memory=(torch.zeros(B, G, D, DV + 1), torch.zeros(B, G, D))), "memory shapes"),
        (dict(memory=(torch.zeros(B, G, D, DV, dtype=torch.bfloat16), torch.zeros(B, G, D))), "float32"),
        (dict(memory_key_scale=0.0), "memory_key_scale must be > 0, got 0.0"),
        (dict(memory_query_scale=-1.0), "memory_query_scale must be > 0, got -1.0"),
        (dict(memory_key_scale=torch.ones(H)), f"memory_key_scale must be a number or have shape \\({G},\\)"),
        (dict(memory_query_scale=torch.ones(G)), f"memory_query_scale must be a number or have shape \\({H},\\)"),
    ],
)
def test_bad_input_raises_value_error_naming_values(kwargs, message):
    q, k, v, gate = make_inputs(2)
    args = dict(segment_length=N)
    args.update(kwargs)
    memory = args.pop("memory", None)
    with pytest.raises(ValueError, match=message):
        infini_attention(q, k, v, gate, memory, **args)


def test_bad_shapes_raise_value_error():
    q, k, v, gate = make_inputs(2)
    with pytest.raises(ValueError, match="multiple"):
        infini_attention(q, k[:, :1].expand(B, 3, -1, -1), v[:, :1].expand(B, 3, -1, -1), gate, segment_length=N)
    with pytest.raises(ValueError, match="gate"):
        infini_attention(q, k, v, gate[:2], segment_length=N)
    with pytest.raises(ValueError, match="head_dim"):
        infini_attention(q[0], k, v, gate, segment_length=N)


@pytest.mark.parametrize("half_products", [False, True])
def test_core_attention_module_passes_the_products_setting(half_products):
    from megatron.core.transformer.enums import AttnMaskType

    from modeling.config import ModelConfig, build_transformer_config
    from modeling.layers import InfiniCoreAttention

    config = build_transformer_config(
        ModelConfig(num_attention_heads=H, num_query_groups=G, segment_length=N),
        infini_half_memory_products=half_products,
    )
    module = InfiniCoreAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v, _ = make_inputs(3)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    got, _ = module(q, k, v)
    want, _ = infini_attention(q, k, v, module.gate, segment_length=N, half_memory_products=half_products)
    other, _ = infini_attention(q, k, v, module.gate, segment_length=N, half_memory_products=not half_products)
    assert torch.equal(got, want) and not torch.equal(got, other)
