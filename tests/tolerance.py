"""Float tolerances that follow the dtype and the size of the reductions, not one machine's rounding.

Two computations of the same values differ by rounding alone when they sum in different orders: chunked
against whole, another TP/PP/DP layout, a float64 reference, or the kernels another CPU or thread count
picks. Rounding k times at unit roundoff u = eps / 2 moves a result by at most about k * u of the magnitude
of its terms (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1). When the rounding
errors behave as independent zero-mean variables, the error stays below lam * sqrt(k) * u with probability
at least 1 - 2 exp(-lam^2 / 2) (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019). Two such results differ
by twice that, so the bound used here is

    eps * min(k, LAMBDA * sqrt(k)),   k = reduction_size * depth,

with LAMBDA = 8 (odds of about 1e-14 per sum): the worst case for a handful of roundings, the probabilistic
bound beyond 64, where the worst case would grow too loose to catch anything. reduction_size is the
largest number of terms summed into one value (a hidden size, a token count); depth is how many such sums
an error passes through in sequence (layers, forward and backward, windows of carried memory, optimizer
steps). The magnitude of the terms is taken as the largest magnitude of the expected values, so elements
that cancel to near zero are held to the tensor's scale, not to their own.
"""

import math

import torch

LAMBDA = 8.0


def tolerance(dtype: torch.dtype, reduction_size: int, depth: int = 1) -> float:
    """The relative bound on the rounding difference of two computations in dtype (see the module doc)."""
    rounding_steps = reduction_size * depth
    return torch.finfo(dtype).eps * min(rounding_steps, LAMBDA * math.sqrt(rounding_steps))


def assert_close(actual, expected, dtype: torch.dtype, reduction_size: int, depth: int = 1, what: str = "") -> None:
    """Elementwise |actual - expected| <= bound * (|expected| + max |expected|), compared in float64;
    what names the compared values in the failure message."""
    actual, expected = (torch.as_tensor(x, dtype=torch.float64) for x in (actual, expected))
    bound = tolerance(dtype, reduction_size, depth)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=bound, atol=bound * scale, msg=(lambda m: f"{what}: {m}") if what else None
    )
