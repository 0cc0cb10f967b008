"""Context parallelism (parallel.context): a window's segments split over the ranks of a CP group.

References: the float64 loop of tests/model/reference.py over the whole window in one process (for the
memory exchange), one process training the same global batches (for training).
"""

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.reference import reference_infini_attention
from tests.tolerance import tolerance
from tests.training.helpers import assert_same_steps, steps_worker, train_overrides

# The memory exchange: 3 lanes, 8 segments of 4 tokens, GQA (4 query heads, 2 KV heads).
LANES, HEADS, GROUPS, D, DV, N, SEGMENTS = 3, 4, 2, 8, 6, 4, 8
# Lane 0 holds no document start; lane 1 one inside the first rank's group (segment 1), so every later rank's
# memory starts from it; lane 2 starts documents at segments 0, 5 and 6.
RESET = torch.zeros(LANES, SEGMENTS, dtype=torch.bool)
RESET[1, 1] = True
RESET[2, [0, 5, 6]] = True


def exchange_inputs():
    gen = torch.Generator().manual_seed(0)
    t = SEGMENTS * N
    return dict(
        q=torch.randn(LANES, HEADS, t, D, generator=gen),
        k=torch.randn(LANES, GROUPS, t, D, generator=gen),
        v=torch.randn(LANES, GROUPS, t, DV, generator=gen),
        gate=torch.randn(HEADS, generator=gen),
        M=torch.randn(LANES, GROUPS, D, DV, generator=gen),
        z=torch.rand(LANES, GROUPS, D, generator=gen) * 3,
        probe=torch.randn(LANES, HEADS, t, DV, generator=gen),
        probe_M=torch.randn(LANES, GROUPS, D, DV, generator=gen),
        probe_z=torch.randn(LANES, GROUPS, D, generator=gen),
    )


def probed_loss(out, M, z, inputs, last_rank: bool):
    """The outputs against a fixed probe; the window's final memory counted once (on the last rank)."""
    loss = (out * inputs["probe"].to(out.dtype)).sum()
    if last_rank:
        loss = loss + (M * inputs["probe_M"].to(M.dtype)).sum() + (z * inputs["probe_z"].to(z.dtype)).sum()
    return loss


def exchange_worker(rank, world, inputs, dtype):
    """This rank's share of the window through infini_attention with context_group: its outputs, the final
    memory, and the gradients of its inputs."""
    import torch.distributed as dist

    from modeling.infini_attention import infini_attention

    dist.init_process_group("gloo", rank=rank, world_size=world)
    per_rank = SEGMENTS // world
    tokens = slice(rank * per_rank * N, (rank + 1) * per_rank * N)
    leaves = {name: inputs[name].to(dtype).requires_grad_() for name in ("q", "k", "v", "gate", "M", "z")}
    q, k, v = (leaves[name][:, :, tokens] for name in ("q", "k", "v"))
    reset = RESET[:, rank * per_rank : (rank + 1) * per_rank]
    probe = {**inputs, "probe": inputs["probe"][:, :, tokens]}
    out, (M, z) = infini_attention(
        q,
        k,
        v,
        leaves["gate"],
        (leaves["M"], leaves["z"]),
        segment_length=N,
        reset=reset,
        context_group=dist.group.WORLD,
    )
    probed_loss(out, M, z, probe, rank == world - 1).backward()
    with pytest.raises(ValueError, match="delta update reads"):
        infini_attention(
            q,
            k,
            v,
            leaves["gate"],
            (leaves["M"], leaves["z"]),
            segment_length=N,
            update="delta",
            reset=reset,
            context_group=dist.group.WORLD,
        )
    with pytest.raises(ValueError, match="fused_memory_write"):
        group = dist.group.WORLD
        infini_attention(q, k, v, leaves["gate"], segment_length=N, context_group=group, fused_memory_write=True)
    return dict(out=out.detach(), M=M.detach(), z=z.detach(), grads={n: x.grad for n, x in leaves.items()})


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_memory_exchange_equals_whole_window(ranks):
    inputs = exchange_inputs()
    leaves = {name: inputs[name].double().requires_grad_() for name in ("q", "k", "v", "gate", "M", "z")}
    ref_out, (ref_M, ref_z) = reference_infini_attention(
        leaves["q"], leaves["k"], leaves["v"], leaves["gate"], (leaves["M"], leaves["z"]), segment_length=N, reset=RESET
    )
    probed_loss(ref_out, ref_M, ref_z, inputs, last_rank=True).backward()

    # Against the float64 loop: all tokens summed into the memory, then read (forward), and back (gradients).
    # In float64 a dropped or doubled term would be off by far more than rounding.
    tokens = SEGMENTS * N
    for dtype in (torch.float64, torch.float32):
        value_tol, grad_tol = tolerance(dtype, tokens, depth=2), tolerance(dtype, tokens, depth=4)
        results = run_distributed(exchange_worker, ranks, inputs, dtype)
        assert rel_err(torch.cat([r["out"] for r in results], dim=2), ref_out) < value_tol
        for r in results:  # every rank returns the memory after the window's last segment
            assert r["M"].dtype == dtype and rel_err(r["M"], ref_M) < value_tol and rel_err(r["z"], ref_z) < value_tol
        for name in ("q", "k", "v"):  # each rank's gradient covers its own tokens only
            per_rank = SEGMENTS // ranks * N
            got = torch.cat(
                [r["grads"][name][:, :, i * per_rank : (i + 1) * per_rank] for i, r in enumerate(results)], dim=2
            )
            assert rel_err(got, leaves[name].grad) < grad_tol, name
        for name in ("gate", "M", "z"):  # shared inputs: the ranks' gradients add up (as over data-parallel ranks)
            assert rel_err(sum(r["grads"][name] for r in results), leaves[name].grad) < grad_tol, name


STEPS = 4
# 4 segments of 16 tokens a window, so that 2 and 4 CP ranks split it; documents of at most 400 tokens start
# inside windows (at segments 1, 2 and 3 within the first steps: inside the first CP rank's group too).
TRAINING = {"data.n_segments": 4, "data.max_doc_tokens": 400, "schedule.steps": STEPS, "model.update": "linear"}
# The layouts sum the memory's writes, the loss and the weight gradients over a step's tokens in other orders.
STEP_TOKENS = 4 * 4 * 16


def window_resets(overrides):
    """The reset flags [steps, lanes, n_segments] of the run's first STEPS batches."""
    from data_pipeline import build_train_loader
    from training.config import load_config, loader_config

    loader = build_train_loader(loader_config(load_config(None, overrides)), 0, 1)
    try:
        return torch.stack([next(loader)["reset"] for _ in range(STEPS)])
    finally:
        loader.close()


@pytest.fixture(scope="module")
def single_process(stdlib_shards, tmp_path_factory):
    overrides = train_overrides(stdlib_shards, str(tmp_path_factory.mktemp("cp1")), **TRAINING)
    resets = window_resets(overrides)
    # Documents start inside windows after the first, in the first of two CP ranks' segments too.
    assert resets[1:, :, 1:].any() and resets[1:, :, 1].any()
    steps = run_distributed(steps_worker, 1, overrides)[0]
    assert len(steps) == STEPS and steps[-1][1] < steps[0][1]  # the optimizer really steps
    return steps


CHECKPOINT_INTERVAL = 2


@pytest.fixture(scope="module")
def context_parallel_run(stdlib_shards, tmp_path_factory):
    """CP2 with checkpoints every CHECKPOINT_INTERVAL steps: (checkpoint root, steps)."""
    run_dir = str(tmp_path_factory.mktemp("cp2"))
    steps = run_distributed(
        steps_worker,
        2,
        train_overrides(
            stdlib_shards, run_dir, **TRAINING, **{"parallel.context": 2, "checkpoint.interval": CHECKPOINT_INTERVAL}
        ),
    )[0]
    return os.path.join(run_dir, "checkpoints"), steps


@pytest.mark.slow
def test_cp2_matches_single_process(context_parallel_run, single_process):
    assert_same_steps(context_parallel_run[1], single_process, STEP_TOKENS)


LAYOUTS = {
    "cp4": (4, {"parallel.context": 4}),
    "cp2xtp2": (4, {"parallel.context": 2, "parallel.tensor": 2}),
    "cp2xpp2": (4, {"parallel.context": 2, "parallel.pipeline": 2, "parallel.micro_batch_lanes": 2}),
    # The 1.3B run config's weight gradients, summed in their GEMM and reduced over DP x CP at the step, with
    # whole layers recomputed as its 64K-token windows run them.
    "cp2xdp2-fused-wgrad-recompute": (
        4,
        {
            "parallel.context": 2,
            "performance.fused_weight_gradients": True,
            "performance.weight_gradient_sum": "weight",
            "model.recompute": True,
        },
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_four_ranks_match_single_process(layout, single_process, stdlib_shards, tmp_path):
    world, extra = LAYOUTS[layout]
    steps = run_distributed(steps_worker, world, train_overrides(stdlib_shards, str(tmp_path), **TRAINING, **extra))[0]
    assert_same_steps(steps, single_process, STEP_TOKENS)


@pytest.mark.slow
def test_resume_is_bitwise(context_parallel_run, stdlib_shards, tmp_path):
    root, uninterrupted = context_parallel_run
    checkpoint = os.path.join(root, f"step_{CHECKPOINT_INTERVAL:08d}")
    steps = run_distributed(
        steps_worker,
        2,
        train_overrides(
            stdlib_shards, str(tmp_path), **TRAINING, **{"parallel.context": 2, "checkpoint.resume": checkpoint}
        ),
    )[0]
    assert steps == uninterrupted[CHECKPOINT_INTERVAL:]


@pytest.mark.slow
def test_reshard_to_one_context_rank(context_parallel_run, single_process, stdlib_shards, tmp_path):
    root, uninterrupted = context_parallel_run
    checkpoint = os.path.join(root, f"step_{CHECKPOINT_INTERVAL:08d}")
    # Both CP ranks carry the memory after the window's last segment (global ranks 0 and 1 are CP ranks 0, 1).
    memories = [
        torch.load(os.path.join(checkpoint, f"rank_{rank:05d}.pt"), weights_only=False)["memory"]["layers"]
        for rank in (0, 1)
    ]
    assert memories[0] is not None
    for first, last in zip(*memories):
        assert torch.equal(first["M"], last["M"]) and torch.equal(first["z"], last["z"])
    steps = run_distributed(
        steps_worker, 1, train_overrides(stdlib_shards, str(tmp_path), **TRAINING, **{"checkpoint.resume": checkpoint})
    )[0]
    assert_same_steps(steps, uninterrupted[CHECKPOINT_INTERVAL:], STEP_TOKENS)
    assert_same_steps(steps, single_process[CHECKPOINT_INTERVAL:], STEP_TOKENS)


def test_config_rules_name_their_keys(tmp_path):
    from training.config import ConfigError, load_config, validate

    base = train_overrides(str(tmp_path / "shards"), str(tmp_path / "run"), **TRAINING)
    with pytest.raises(ConfigError, match=r"data\.n_segments \(4\) must be divisible by parallel\.context \(3\)"):
        load_config(None, base + ["parallel.context=3"])
    with pytest.raises(ConfigError, match=r"parallel\.context=2 needs model\.update=linear \(got 'delta'\)"):
        load_config(None, base + ["parallel.context=2", "model.update=delta"])
    with pytest.raises(ConfigError, match=r"parallel\.context=2 with performance\.fused_memory_write=true"):
        load_config(None, base + ["parallel.context=2", "performance.fused_memory_write=true"])
    with pytest.raises(ConfigError, match=r"parallel\.context must be >= 1"):
        load_config(None, base + ["parallel.context=0"])
    cfg = load_config(None, base + ["parallel.context=2", "parallel.tensor=2"])
    with pytest.raises(
        ConfigError,
        match=r"world size 6 .* parallel\.tensor x parallel\.pipeline x parallel\.context "
        r"\(4\)",
    ):
        validate(cfg, world_size=6)
    validate(cfg, world_size=8)
