"""Where the Triton kernel tests run: compiled on a GPU, or under Triton's interpreter on CPU tensors.

The interpreter must be switched on (TRITON_INTERPRET=1) before Triton is first imported, and megatron-core
imports it: so without a GPU a kernel test module runs itself again in a fresh Python with the switch on
(``run_under_interpreter``), and its checks, marked ``in_process``, run only there.
"""

import os
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IN_PROCESS = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
in_process = pytest.mark.skipif(not IN_PROCESS, reason="runs under Triton's interpreter in a fresh process")
# The interpreter keeps bf16 as raw 16-bit integers in its products (and truncates casts to bf16), so on the
# CPU the half-precision checks take float16.
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def run_under_interpreter(test_file: str) -> None:
    """Runs the test module test_file with TRITON_INTERPRET=1 in a fresh Python; fails with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
