"""Weight gradients summed inside the GEMM (float32 or bf16), against float64 sums of the same products."""

import pytest
import torch

from modeling.weight_gradients import (
    hand_weight_gradients_to_optimizer,
    linear_accumulating_weight_gradient,
    start_weight_gradients,
)
from tests.tolerance import assert_close, tolerance

ROWS, IN, OUT, MICROBATCHES = 64, 48, 40, 32


def _microbatches(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, ROWS // 2, IN, generator=generator, dtype=torch.float64) for _ in range(MICROBATCHES)]
    grads = [torch.randn(2, ROWS // 2, OUT, generator=generator, dtype=torch.float64) for _ in range(MICROBATCHES)]
    # bf16 operands; their float64 products are exact, so the reference carries no rounding of its own.
    to_bf16 = lambda xs: [x.to(torch.bfloat16).to(device) for x in xs]  # noqa: E731
    return to_bf16(inputs), to_bf16(grads)


def _reference(inputs, grads) -> torch.Tensor:
    return sum(g.double().reshape(-1, OUT).t() @ x.double().reshape(-1, IN) for x, g in zip(inputs, grads))


def _fused_sum(inputs, grads, compiled: bool, device="cpu", sum_dtype=torch.float32) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.randn(OUT, IN, dtype=torch.bfloat16, device=device))
    weight.main_grad = torch.zeros(OUT, IN, dtype=sum_dtype, device=device)
    linear = lambda x: linear_accumulating_weight_gradient(x, weight, None)  # noqa: E731
    if compiled:
        linear = torch.compile(linear, fullgraph=True)
    xs = [x.clone().requires_grad_() for x in inputs]
    # Every forward before any backward, as a pipeline's warm-up runs them.
    outputs = [linear(x) for x in xs]
    for x, out, g in zip(xs, outputs, grads):
        out.backward(g)
        # The input's gradient is the plain linear's.
        assert_close(x.grad, g.double() @ weight.detach().double(), torch.bfloat16, OUT, what="input gradient")
    assert weight.grad is None, "the weight gradient must go to main_grad only"
    return weight.main_grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_microbatches_sum_in_float32(compiled):
    inputs, grads = _microbatches()
    expected = _reference(inputs, grads)
    # One float32 sum over every microbatch's rows: ROWS x MICROBATCHES terms.
    assert_close(_fused_sum(inputs, grads, compiled), expected, torch.float32, ROWS * MICROBATCHES)


def test_autograds_bf16_sum_misses_the_float32_bound():
    """What the fusion replaces: autograd adds each microbatch's bf16 weight gradient into a bf16 .grad."""
    inputs, grads = _microbatches()
    weight = torch.nn.Parameter(torch.randn(OUT, IN, dtype=torch.bfloat16))
    for x, g in zip(inputs, grads):
        torch.nn.functional.linear(x, weight).backward(g)
    error = (weight.grad.double() - _reference(inputs, grads)).abs().max()
    scale = _reference(inputs, grads).abs().max()
    assert error > 2 * tolerance(torch.float32, ROWS * MICROBATCHES) * scale


def test_bf16_microbatches_sum_in_bf16_with_one_rounding_each():
    """performance.weight_gradient_sum=weight: the GEMM adds into a bf16 sum, rounding once a microbatch."""
    inputs, grads = _microbatches()
    assert_close(
        _fused_sum(inputs, grads, False, sum_dtype=torch.bfloat16),
        _reference(inputs, grads),
        torch.bfloat16,
        MICROBATCHES,
    )


@pytest.mark.parametrize("sum_dtype", ["float32", "weight"])
def test_each_step_sums_into_its_own_buffer_and_hands_it_over(sum_dtype):
    """Steps of 8 microbatches through one compiled linear: each step's .grad is that step's sum alone, no
    main_grad is kept between steps, and a new buffer does not recompile the graph."""
    inputs, grads = _microbatches()
    weight = torch.nn.Parameter(torch.randn(OUT, IN, dtype=torch.bfloat16))
    torch._dynamo.reset()  # the other sum dtype's graph of this same lambda
    linear = torch.compile(lambda x: linear_accumulating_weight_gradient(x, weight, None), fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            start_weight_gradients([weight], sum_dtype)
            assert weight.main_grad.dtype == (torch.float32 if sum_dtype == "float32" else torch.bfloat16)
            chunk = slice(8 * step, 8 * step + 8)
            for x, g in zip(inputs[chunk], grads[chunk]):
                linear(x.clone().requires_grad_()).backward(g)
            hand_weight_gradients_to_optimizer([weight])
            assert not hasattr(weight, "main_grad")
            assert weight.grad.dtype == torch.bfloat16
            # Rounded to bf16 once (float32 sums) or once a microbatch (bf16 sums).
            terms = ROWS * 8 if sum_dtype == "float32" else 8
            assert_close(weight.grad, _reference(inputs[chunk], grads[chunk]), torch.bfloat16, terms)
            weight.grad = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_microbatches_sum_in_float32_on_the_gpu(compiled):
    inputs, grads = _microbatches("cuda")
    expected = _reference([x.cpu() for x in inputs], [g.cpu() for g in grads])
    actual = _fused_sum(inputs, grads, compiled, "cuda").cpu()
    assert_close(actual, expected, torch.float32, ROWS * MICROBATCHES)
    actual = _fused_sum(inputs, grads, compiled, "cuda", sum_dtype=torch.bfloat16).cpu()
    assert_close(actual, expected, torch.bfloat16, MICROBATCHES)
