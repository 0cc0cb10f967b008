"""Per-step losses of 3D-parallel runs equal one process running the same global batches."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.tolerance import assert_close
from tests.training.helpers import STEP_TOKENS, loss_values, losses_worker, train_overrides, training_depth

STEPS = 5


@pytest.fixture(scope="module")
def single_process_losses(stdlib_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return loss_values(
        run_distributed(losses_worker, 1, train_overrides(stdlib_shards, str(run_dir), **{"schedule.steps": STEPS}))[0]
    )


LAYOUTS = {
    "tp2": (2, {"parallel.tensor": 2}),
    "pp2": (2, {"parallel.pipeline": 2}),
    "dp2-zero1": (2, {"parallel.zero_stage": 1}),
    "dp2-zero2": (2, {"parallel.zero_stage": 2}),
    "dp2-zero3": (2, {"parallel.zero_stage": 3}),
    "tp2xpp2": (4, {"parallel.tensor": 2, "parallel.pipeline": 2}),
    "pp2xdp2": (4, {"parallel.pipeline": 2, "parallel.zero_stage": 1}),
    # Weight gradients summed in the GEMM: the TP input-gradient all-reduce, a pipeline's forwards ahead of
    # their backwards, ZeRO-1's reduction over DP of the sums handed over at the step.
    "tp2xpp2-fused-wgrad": (
        4,
        {"parallel.tensor": 2, "parallel.pipeline": 2, "performance.fused_weight_gradients": True},
    ),
    "pp2xdp2-fused-wgrad": (4, {"parallel.pipeline": 2, "performance.fused_weight_gradients": True}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_match_single_process(layout, stdlib_shards, single_process_losses, tmp_path):
    world, extra = LAYOUTS[layout]
    results = run_distributed(
        losses_worker, world, train_overrides(stdlib_shards, str(tmp_path), **{"schedule.steps": STEPS, **extra})
    )
    assert len(single_process_losses) == STEPS
    # Losses fall: the optimizer really steps (a broken update would also match between layouts).
    assert single_process_losses[-1] < single_process_losses[0]
    # The layouts split the sums over the hidden sizes and the step's tokens in other orders.
    assert_close(loss_values(results[0]), single_process_losses, torch.float32, STEP_TOKENS, training_depth(STEPS))


def test_fused_weight_gradients_need_zero_stage_1(stdlib_shards, tmp_path):
    from training.config import ConfigError, load_config

    overrides = train_overrides(stdlib_shards, str(tmp_path), **{"performance.fused_weight_gradients": True})
    for stage in (2, 3):
        with pytest.raises(
            ConfigError, match=rf"parallel\.zero_stage={stage} with performance\.fused_weight_gradients"
        ):
            load_config(None, overrides + [f"parallel.zero_stage={stage}"])
    assert load_config(None, overrides + ["parallel.zero_stage=1"]).performance.fused_weight_gradients
    with pytest.raises(
        ConfigError, match=r"performance\.weight_gradient_sum must be one of float32, weight, got 'fp16'"
    ):
        load_config(None, overrides + ["performance.weight_gradient_sum=fp16"])
