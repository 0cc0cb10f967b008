"""The layout planner: its memory arithmetic, its validity rules, its CLI, the large-model presets, and its
memory figure against what the real trainer keeps on the CPU."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

from modeling.config import ModelConfig
from tests.distributed import run_distributed
from tests.training.helpers import train_overrides
from training.plan import (
    Layout,
    Workload,
    candidate_layouts,
    invalid_reason,
    load_model,
    memory_estimate,
    microbatches_in_flight,
    parse_args,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tiny run of conftest.train_overrides: 4 layers, hidden 32, 4 heads in 2 KV groups, SwiGLU 64,
# segments of 16, windows of 2 segments, 4 lanes a step, one lane a microbatch, fp32, ZeRO-1.
TINY = ModelConfig(
    num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64, segment_length=16
)
TINY_WORKLOAD = Workload(window=32, global_lanes=4, precision="fp32")
# Segments of 6 tokens: a CP rank's share of a 2-segment window does not split over 4 TP ranks.
SHORT_SEGMENTS = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, segment_length=6)


def test_memory_figures_equal_a_hand_count():
    # Parameters counted from the shapes: qkv, output projection, gates, SwiGLU, two norms; final norm;
    # embedding and output layer over the vocabulary padded to 128.
    h, a, g, d, f, L, vocab = 32, 4, 2, 8, 64, 4, 384
    per_layer = h * (a * d + 2 * g * d) + a * d * h + a + 3 * h * f + 2 * h
    params = L * per_layer + h + 2 * vocab * h
    est = memory_estimate(TINY, Layout(), TINY_WORKLOAD)
    assert est.weights == 4 * params and est.gradients == 4 * params
    assert est.optimizer == 12 * params  # DeepSpeed's fp32 partition + Adam's two moments
    # Saved per token of one layer, fp32 eager, in bytes: two decomposed norms (input, normalised, rstd)
    # and the QKV/FC1 inputs; QKV output kept (views) + the GQA query copy; SDPA q,k,v,out + lse; the
    # memory's sigma(k), v, 2x sigma(q); numerator, retrieval, gated local + denominator and mask;
    # per segment M and z of each query head; the projection input; SwiGLU's 5 x ffn.
    per_token = (
        2 * (2 * h * 4 + 4 + h * 4)
        + (a * d + 2 * g * d) * 4
        + a * d * 4
        + 4 * a * d * 4
        + a * 4
        + (2 * g * d + 2 * a * d) * 4
        + 3 * a * d * 4
        + a * 5
        + a * (d * d + d) * 4 / 16
        + a * d * 4
        + 5 * f * 4
    )
    assert est.activations_per_microbatch == pytest.approx(per_token * 32 * L)
    assert est.logits == 32 * vocab * 4
    assert est.carried_memory == L * 4 * g * (d * d + d) * 4
    assert est.gradient_bucket == 5e8 * 4  # ZeRO-1's fp32 reduction bucket
    # ZeRO-3 over 4 ranks shards all three; TP 2 halves the weights.
    sharded = memory_estimate(TINY, Layout(dp=4, zero=3), TINY_WORKLOAD)
    assert sharded.weights == est.weights / 4 and sharded.gradients == est.gradients / 4
    assert sharded.optimizer == est.optimizer / 4
    assert memory_estimate(TINY, Layout(tp=2), TINY_WORKLOAD).weights == est.weights / 2
    # The trainer's optimizer group is DP x CP: CP 2 x DP 2 shards as DP 4 does.
    context_sharded = memory_estimate(TINY, Layout(cp=2, dp=2, zero=3), TINY_WORKLOAD)
    assert context_sharded.optimizer == sharded.optimizer and context_sharded.weights == sharded.weights


def test_pipeline_holds_microbatches_in_flight():
    workload = Workload(window=32, global_lanes=8, precision="fp32")
    one = memory_estimate(TINY, Layout(), workload)
    piped = memory_estimate(TINY, Layout(pp=2), workload)
    assert piped.in_flight == 2 and piped.activations == pytest.approx(one.activations)  # half the layers, twice
    interleaved = memory_estimate(TINY, Layout(pp=2, vp=2), workload)
    assert interleaved.in_flight == (1 * 2 + 2 * 1 + 1) / 2  # megatron's warm-up: (V-1)p + 2(p-1) + 1 chunks


def _megatron_rank0_chunks_before_first_backward(pp, vp, microbatches):
    """Pipeline rank 0's warm-up forwards by megatron's own count, plus the steady state's first forward
    (1F1B runs a forward before each backward); all of them when every microbatch is in warm-up."""
    group = SimpleNamespace(size=lambda: pp, rank=lambda: 0)
    communicator = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
    total, all_warmup, warmup, _ = get_pp_rank_microbatches(microbatches, vp, pp, p2p_communicator=communicator)
    return total if all_warmup else warmup + 1


@pytest.mark.parametrize(
    "pp, vp, microbatches",
    [
        (2, 1, 1),
        (2, 1, 8),
        (4, 1, 3),
        (4, 1, 16),
        (8, 1, 32),
        (2, 2, 2),
        (2, 2, 8),
        (4, 2, 4),
        (4, 2, 16),
        (4, 4, 8),
        (8, 2, 32),
        (8, 4, 64),
    ],
)
def test_in_flight_matches_megatrons_schedule(pp, vp, microbatches):
    chunks = _megatron_rank0_chunks_before_first_backward(pp, vp, microbatches)
    assert microbatches_in_flight(Layout(pp=pp, vp=vp), microbatches) == pytest.approx(chunks / vp)


@pytest.mark.parametrize(
    "layout, gpus, reason",
    [
        (Layout(tp=3), 3, "does not divide 4 heads"),
        (Layout(tp=4), 4, "does not divide 2 KV groups"),
        (Layout(pp=2, zero=3, dp=2), 4, "ZeRO-3 with PP 2"),
        (Layout(pp=2, zero=2, dp=2), 4, "ZeRO-2 with PP 2"),
        (Layout(zero=0, dp=4), 4, "stage 1, 2 or 3"),
        (Layout(sp=True, dp=4), 4, "SP needs TP > 1"),
        (Layout(pp=8), 8, "does not divide 4 layers"),
        (Layout(pp=2, vp=4, dp=2), 4, "does not divide 4 layers"),
        (Layout(cp=4), 4, "does not divide the window's 2 segments"),
        (Layout(dp=3), 4, "not 4 GPUs"),
        (Layout(dp=4, micro_lanes=2), 4, "do not divide 1 lanes a DP rank"),
    ],
)
def test_invalid_layouts_are_excluded(layout, gpus, reason):
    found = invalid_reason(TINY, layout, TINY_WORKLOAD, gpus, gpus_per_node=8)
    assert found is not None and reason in found


def test_cp_needs_the_linear_update():
    delta = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, segment_length=16, update="delta")
    assert "linear update" in invalid_reason(delta, Layout(cp=2), TINY_WORKLOAD, 2, gpus_per_node=8)
    assert invalid_reason(TINY, Layout(cp=2), TINY_WORKLOAD, 2, gpus_per_node=8) is None


def test_sp_needs_tp_to_divide_a_cp_ranks_tokens():
    workload = Workload(window=12, global_lanes=8, precision="fp32")
    assert "does not divide a CP rank's 6 tokens" in invalid_reason(
        SHORT_SEGMENTS, Layout(tp=4, sp=True, cp=2), workload, 8, gpus_per_node=8
    )
    assert invalid_reason(SHORT_SEGMENTS, Layout(tp=2, sp=True, cp=2, dp=2), workload, 8, gpus_per_node=8) is None


def _trainer_config(layout, workload, model=TINY):
    from training.config import TrainConfig

    cfg = TrainConfig(model=model)
    cfg.data.n_segments = workload.window // model.segment_length
    cfg.data.global_lanes = workload.global_lanes
    cfg.parallel.tensor, cfg.parallel.sequence_parallel = layout.tp, layout.sp
    cfg.parallel.pipeline, cfg.parallel.virtual_pipeline = layout.pp, layout.vp
    cfg.parallel.context, cfg.parallel.zero_stage = layout.cp, layout.zero
    cfg.parallel.micro_batch_lanes = layout.micro_lanes
    cfg.performance.compile_loss = workload.compile_loss
    return cfg


@pytest.mark.parametrize(
    "model, gpus, workload",
    [
        (TINY, 4, TINY_WORKLOAD),
        (TINY, 8, Workload(window=64, global_lanes=16, precision="fp32")),
        (TINY, 8, Workload(window=48, global_lanes=8, precision="fp32", compile_loss=True)),
        (SHORT_SEGMENTS, 8, Workload(window=12, global_lanes=8, precision="fp32")),
    ],
)
def test_planner_and_trainer_config_accept_the_same_layouts(model, gpus, workload):
    """Every layout the planner enumerates is accepted by training.config.validate exactly when the planner
    finds it valid (the rules the trainer does not check, TP over the KV groups and TP within a node, aside)."""
    from training.config import ConfigError, validate

    for layout in candidate_layouts(gpus, micro_lanes=(1, 2), vps=(1, 2)):
        reason = invalid_reason(model, layout, workload, gpus, gpus_per_node=8)
        if reason and ("KV groups" in reason or "spans more than a node" in reason):
            continue
        try:
            validate(_trainer_config(layout, workload, model), world_size=gpus)
            accepted = None
        except ConfigError as error:
            accepted = str(error)
        assert (reason is None) == (accepted is None), (layout, reason, accepted)


def test_candidates_cover_exactly_the_valid_layouts():
    valid = [lay for lay in candidate_layouts(4) if invalid_reason(TINY, lay, TINY_WORKLOAD, 4, 8) is None]
    assert valid and all(lay.gpus == 4 for lay in valid)
    assert not any(lay.zero >= 2 and lay.pp > 1 for lay in valid)
    assert {lay.zero for lay in valid} == {1, 2, 3}
    assert not any(lay.tp == 4 for lay in valid)  # 2 KV groups
    assert any(lay.tp == 2 and lay.sp for lay in valid) and any(lay.cp == 2 for lay in valid)
    assert any(lay.vp == 2 for lay in valid)
    assert not any(TINY.num_layers % (lay.pp * lay.vp) for lay in valid)


def test_tp_beyond_a_node_is_excluded():
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=16, segment_length=16)
    assert "spans more than a node" in invalid_reason(model, Layout(tp=16), TINY_WORKLOAD, 16, gpus_per_node=8)


def _measure(rank, world, overrides):
    """Bytes the real trainer holds: live tensors just before the second optimizer step (weights,
    gradients, master weights, Adam state, carried memory, the batch) plus the largest set of tensors
    autograd saved for one microbatch's backward (excluding parameters)."""
    import gc

    import torch

    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    microbatches = trainer.num_slots
    saved = {}
    live_before_step = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage  # held, so no address is reused within the step
        return tensor

    def live_bytes():
        storages = {}
        for obj in gc.get_objects():
            if torch.is_tensor(obj):
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return sum(storages.values())

    real_step = trainer.engine.step

    def step(*args, **kwargs):
        live_before_step.append(live_bytes())
        return real_step(*args, **kwargs)

    trainer.engine.step = step
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches))  # Adam's state exists from the first step on
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train_step(next(batches))
    per_microbatch = sum(storage.nbytes() for storage in saved.values()) / microbatches
    trainer.close()
    return live_before_step[-1], per_microbatch


def test_planner_matches_the_cpu_trainer_within_15_percent(stdlib_shards, tmp_path):
    states, activations = run_distributed(_measure, 1, train_overrides(stdlib_shards, str(tmp_path)))[0]
    measured = states + activations
    est = memory_estimate(TINY, Layout(), TINY_WORKLOAD)
    assert abs(est.total - measured) / measured < 0.15, (est, states, activations)
    assert abs(est.activations + est.logits - activations) / activations < 0.15


def test_cli_prints_a_table_and_a_recommendation():
    proc = subprocess.run(
        [sys.executable, "-m", "training.plan", "--model", "1.3b", "--gpus", "8", "--top", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| TP | SP | PP | V | CP | DP | ZeRO | recompute") for line in lines)
    assert sum(line.startswith("| ") and line[2].isdigit() for line in lines) == 5
    assert lines[-1].startswith("recommendation: TP ")


def test_cli_speed_settings_default_to_the_gpu_run_configs_and_can_be_turned_off():
    import yaml

    with open(os.path.join(REPO, "configs", "performance", "gpu.yaml")) as f:
        gpu = yaml.safe_load(f)
    keys = ("half_memory_products", "compile_loss", "compile_layers", "loss_chunk_tokens")
    args = parse_args(["--model", "1.3b", "--gpus", "8"])
    assert {key: getattr(args, key) for key in keys} == {key: gpu[key] for key in keys}
    off = parse_args(["--model", "1.3b", "--gpus", "8", "--no-compile-loss", "--no-half-memory-products"])
    assert (off.compile_loss, off.half_memory_products) == (False, False)


def test_compiled_loss_keeps_bf16_logits_and_gradient_at_every_tp():
    compiled = Workload(window=32, global_lanes=4, compile_loss=True)
    megatron = Workload(window=32, global_lanes=4)
    for tp in (1, 2):
        share = 32 * TINY.padded_vocab_size(tp) / tp
        assert memory_estimate(TINY, Layout(tp=tp), compiled).logits == share * (2 + 2)
        assert memory_estimate(TINY, Layout(tp=tp), megatron).logits == share * (4 + 2)


def test_cli_bad_model():
    bad = subprocess.run(
        [sys.executable, "-m", "training.plan", "--model", "nope", "--gpus", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "'nope'" in bad.stderr


@pytest.mark.parametrize(
    "name, shape",
    [
        ("7b", (32, 4096, 32, 32, 11008)),
        ("13b", (40, 5120, 40, 40, 13824)),
        ("70b", (80, 8192, 64, 8, 28672)),
    ],
)
def test_large_model_presets(name, shape):
    model = load_model(name)
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.query_groups, model.ffn_size) == shape
    assert model.vocab_size == 32000


LAYOUT_FILES = sorted(f for f in os.listdir(os.path.join(REPO, "configs", "layouts")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", LAYOUT_FILES)
def test_layout_presets_load_validate_and_match_their_header(name):
    """Each file validates for its world size, and its parallel keys are the layout its header quotes."""
    from training.config import load_config, validate

    path = os.path.join(REPO, "configs", "layouts", name)
    cfg = load_config(path)
    gpus = int(name.split("_")[1].removesuffix("gpu.yaml"))
    validate(cfg, world_size=gpus)
    with open(path) as f:
        header = f.read()
    quoted = re.search(r"TP (\d+)( \+ SP)?, PP (\d+), V (\d+), CP (\d+), DP (\d+), ZeRO-(\d), recompute (\w+)", header)
    assert quoted, f"{path}: no planner pick in the header"
    tp, sp, pp, vp, cp, dp, zero, recompute = quoted.groups()
    par = cfg.parallel
    assert (par.tensor, par.sequence_parallel, par.pipeline, par.virtual_pipeline, par.context, par.zero_stage) == (
        int(tp),
        bool(sp),
        int(pp),
        int(vp),
        int(cp),
        int(zero),
    )
    assert gpus // (par.tensor * par.pipeline * par.context) == int(dp)
    model_recompute = "full" if cfg.model.recompute else "selective" if cfg.model.recompute_attention else "none"
    assert model_recompute == recompute
