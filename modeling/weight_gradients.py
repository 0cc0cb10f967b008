"""The transformer layers' weight gradients, summed inside their GEMM over a step's microbatches.

Without this, autograd sums each microbatch's weight gradient into ``.grad`` with a separate add, in the
weight's dtype: in bf16 runs two bf16 roundings per microbatch (the product's and the sum's; 32
microbatches a step in the 1.3B run config) and one add kernel per weight and microbatch. With it, each
microbatch's weight-gradient GEMM adds grad_output^T input straight into the weight's ``main_grad``, in
float32 or the weight's dtype (megatron-core's ``gradient_accumulation_fusion``, which needs an apex
extension; here a registered operator, so a compiled layer keeps it as one node).
``hand_weight_gradients_to_optimizer`` gives the step's sum to the optimizer as ``.grad``, in the weight's
dtype.

The optimizer must read ``.grad`` only at its step, as DeepSpeed ZeRO-1 does; ZeRO-2/3 reduce gradients in
hooks during backward, which a gradient that autograd never sees would not reach.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

WEIGHT_GRADIENT_SUMS = ("float32", "weight")
"""The dtypes a ``main_grad`` sums in: float32, or the weight's own."""


@torch.library.custom_op("infinitron::accumulate_weight_gradient", mutates_args=("main_grad",))
def accumulate_weight_gradient(main_grad: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    """main_grad += grad_output^T input, over all leading dimensions of both."""
    grad_output = grad_output.reshape(-1, grad_output.shape[-1])
    input = input.reshape(-1, input.shape[-1])
    if main_grad.dtype == input.dtype:
        main_grad.addmm_(grad_output.t(), input)
    elif main_grad.is_cuda:
        # Half-precision operands, float32 accumulator read and written by the GEMM itself (beta = 1).
        torch.addmm(main_grad, grad_output.t(), input, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), input.to(main_grad.dtype))


class _LinearAccumulatingWeightGradient(torch.autograd.Function):
    """input @ weight^T (+ bias); backward returns no weight gradient and adds it to main_grad instead."""

    @staticmethod
    def forward(ctx, input, weight, main_grad, bias):
        ctx.save_for_backward(input, weight)
        # Not a saved tensor: every microbatch's backward adds to it, and a pipeline runs several forwards
        # before their backwards, which the saved-tensor version check would refuse.
        ctx.main_grad = main_grad
        ctx.has_bias = bias is not None
        output = torch.matmul(input, weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        accumulate_weight_gradient(ctx.main_grad, grad_output, input)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_input, None, None, grad_bias


def linear_accumulating_weight_gradient(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """A linear whose weight gradient goes to ``weight.main_grad`` (see ``start_weight_gradients``)."""
    return _LinearAccumulatingWeightGradient.apply(input, weight, weight.main_grad, bias)


def fused_weights(modules: Iterable[torch.nn.Module]) -> List[torch.nn.Parameter]:
    """The weights of every linear among the modules' submodules that accumulates its weight gradient."""
    return [
        sub.weight
        for module in modules
        for sub in module.modules()
        if getattr(sub, "accumulates_weight_gradient", False) and sub.weight.requires_grad
    ]


def start_weight_gradients(weights: Sequence[torch.nn.Parameter], sum_dtype: str = "float32") -> None:
    """Before a step's first forward: every fused weight gets a zeroed ``main_grad`` on its device, in float32
    or (sum_dtype 'weight') the weight's dtype. Between steps there is none, so the sums take memory only
    while a step runs, as autograd's ``.grad`` does; without one the linear is megatron's (validation)."""
    if sum_dtype not in WEIGHT_GRADIENT_SUMS:
        raise ValueError(f"sum_dtype must be one of {WEIGHT_GRADIENT_SUMS}, got {sum_dtype!r}")
    for weight in weights:
        dtype = torch.float32 if sum_dtype == "float32" else weight.dtype
        weight.main_grad = torch.zeros(weight.shape, dtype=dtype, device=weight.device)


@torch.no_grad()
def hand_weight_gradients_to_optimizer(weights: Sequence[torch.nn.Parameter]) -> None:
    """Once a step, after the last backward: each fused weight's ``.grad`` becomes its summed ``main_grad``
    (the buffer itself where it has the weight's dtype, else a copy in that dtype), and the weight keeps no
    ``main_grad`` until ``start_weight_gradients``."""
    for weight in weights:
        summed = weight.main_grad
        weight.grad = summed if summed.dtype == weight.dtype else summed.to(weight.dtype)
        del weight.main_grad
