"""Sequence parallelism (parallel.sequence_parallel): the same training as one process with less activation
memory per rank, also with the compiled vocab-parallel loss, and checkpoints that move between it and plain
tensor parallelism.

References: one process (TP=1) training the same global batches; the activations a TP=2 rank saves
without sequence parallelism; the uninterrupted run a resumed one continues.
"""

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.helpers import assert_same_steps, steps_worker, train_overrides

STEPS = 6
CHECKPOINT_INTERVAL = 2
# q/k norms: their gradients are partial sums over TP ranks (own heads) with or without sequence parallelism.
MODEL = {"model.qk_layernorm": True, "schedule.steps": STEPS}
SEQUENCE_PARALLEL = {"parallel.tensor": 2, "parallel.sequence_parallel": True}


@pytest.fixture(scope="module")
def single_process(stdlib_shards, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tp1"))
    steps = run_distributed(steps_worker, 1, train_overrides(stdlib_shards, run_dir, **MODEL))[0]
    assert len(steps) == STEPS and steps[-1][1] < steps[0][1]  # the optimizer really steps
    return steps


@pytest.fixture(scope="module")
def sequence_parallel_run(stdlib_shards, tmp_path_factory):
    """TP2 + SP with ZeRO-2 (gradients taken during backward), full recompute and the chunked loss;
    checkpoints every CHECKPOINT_INTERVAL steps."""
    run_dir = str(tmp_path_factory.mktemp("tp2-sp"))
    steps = run_distributed(
        steps_worker,
        2,
        train_overrides(
            stdlib_shards,
            run_dir,
            **MODEL,
            **SEQUENCE_PARALLEL,
            **{
                "parallel.zero_stage": 2,
                "model.recompute": True,
                "performance.loss_chunk_tokens": 8,
                "checkpoint.interval": CHECKPOINT_INTERVAL,
            },
        ),
    )[0]
    return os.path.join(run_dir, "checkpoints"), steps


@pytest.mark.slow
def test_tp2_sequence_parallel_matches_single_process(single_process, sequence_parallel_run):
    assert_same_steps(sequence_parallel_run[1], single_process)


@pytest.mark.slow
def test_tp2_sequence_parallel_compiled_loss_matches_single_process(single_process, stdlib_shards, tmp_path):
    """performance.compile_loss over each TP rank's share of the vocabulary, in chunks of the SP-gathered
    sequence, against one process with megatron's cross-entropy."""
    compiled_loss = {"performance.compile_loss": True, "performance.loss_chunk_tokens": 8}
    steps = run_distributed(
        steps_worker, 2, train_overrides(stdlib_shards, str(tmp_path), **MODEL, **SEQUENCE_PARALLEL, **compiled_loss)
    )[0]
    assert_same_steps(steps, single_process)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        {
            "parallel.pipeline": 2,
            "parallel.zero_stage": 1,
            "model.recompute_attention": True,
            "parallel.micro_batch_lanes": 2,
        },
        {"parallel.zero_stage": 3},
        # Row-parallel linears sum their weight gradients in the GEMM, column-parallel ones gather the sequence.
        {"parallel.pipeline": 2, "parallel.zero_stage": 1, "performance.fused_weight_gradients": True},
    ],
    ids=["tp2xpp2-zero1-selective-recompute", "tp2xdp2-zero3", "tp2xpp2-zero1-fused-wgrad"],
)
def test_four_rank_sequence_parallel_matches_single_process(layout, single_process, stdlib_shards, tmp_path):
    steps = run_distributed(
        steps_worker, 4, train_overrides(stdlib_shards, str(tmp_path), **MODEL, **SEQUENCE_PARALLEL, **layout)
    )[0]
    assert_same_steps(steps, single_process)


@pytest.mark.slow
def test_checkpoints_move_between_sequence_parallel_and_plain_tp(sequence_parallel_run, stdlib_shards, tmp_path):
    checkpoints, straight = sequence_parallel_run
    plain_dir = str(tmp_path / "plain")
    resumed_plain = run_distributed(
        steps_worker,
        2,
        train_overrides(
            stdlib_shards,
            plain_dir,
            **MODEL,
            **{
                "parallel.tensor": 2,
                "parallel.zero_stage": 2,
                "checkpoint.interval": CHECKPOINT_INTERVAL,
                "checkpoint.resume": os.path.join(checkpoints, f"step_{CHECKPOINT_INTERVAL:08d}"),
            },
        ),
    )[0]
    assert_same_steps(resumed_plain, straight[CHECKPOINT_INTERVAL:])
    # And back: the plain TP run's checkpoint resumes with sequence parallelism.
    back = 2 * CHECKPOINT_INTERVAL
    resumed_sp = run_distributed(
        steps_worker,
        2,
        train_overrides(
            stdlib_shards,
            str(tmp_path / "back"),
            **MODEL,
            **SEQUENCE_PARALLEL,
            **{
                "parallel.zero_stage": 2,
                "checkpoint.resume": os.path.join(plain_dir, "checkpoints", f"step_{back:08d}"),
            },
        ),
    )[0]
    assert_same_steps(resumed_sp, straight[back:])


SEQ, LANES, HIDDEN, TP = 64, 2, 64, 2


def saved_activations_worker(rank, world):
    """Bytes and shapes of the tensors one training forward saves for backward on this rank (parameters
    left out), without and with sequence parallelism, from the same weights and tokens."""
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.init import init_weights
    from modeling.model import build_model
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(TP, 1)
    # FFN and vocabulary widths unlike the hidden size, so [s, b, h] picks out the norm/residual region.
    cfg = ModelConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=3 * HIDDEN, segment_length=SEQ // 2
    )
    tokens = torch.randint(0, cfg.vocab_size, (LANES, SEQ), generator=torch.Generator().manual_seed(0))
    saved_by_layout = {}
    for sequence_parallel in (False, True):
        model = build_model(
            build_transformer_config(cfg, tensor_parallel_size=TP, sequence_parallel=sequence_parallel),
            cfg.padded_vocab_size(TP),
        )
        init_weights(model, 0)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape))
            return tensor

        with megatron_on_cpu(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(tokens, tokens, None, None)
        saved_by_layout[sequence_parallel] = list(saved.values())
    return saved_by_layout


def region_shapes(saved, seq):
    """Shapes of the saved [seq, b, h] hidden states and [seq, b, 1] norm statistics."""
    return sorted(shape for _, shape in saved if shape in ((seq, LANES, HIDDEN), (seq, LANES, 1)))


@pytest.mark.slow
def test_sequence_parallel_divides_the_norm_and_residual_activations():
    saved = run_distributed(saved_activations_worker, TP)[0]
    plain, sharded = saved[False], saved[True]
    # Each of the 2 x 2 + 1 norms keeps at least its input and its output (the next projection's input).
    assert len(region_shapes(plain, SEQ)) >= 2 * (2 * 2 + 1)
    # What sequence parallelism promises: that region (norms, residual stream) split over the TP ranks,
    # every other saved activation (attention, FFN, logits) as it was.
    assert region_shapes(sharded, SEQ // TP) == [(SEQ // TP, *shape[1:]) for shape in region_shapes(plain, SEQ)]
    assert not region_shapes(sharded, SEQ)
    region_bytes = sum(nbytes for nbytes, shape in plain if shape in region_shapes(plain, SEQ))
    assert sum(n for n, _ in sharded) == sum(n for n, _ in plain) - region_bytes * (TP - 1) // TP


def test_sequence_parallel_needs_tensor_parallel_and_a_divisible_window(tmp_path):
    from training.config import ConfigError, load_config

    base = train_overrides(str(tmp_path / "shards"), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel needs parallel\.tensor > 1 \(got 1\)"):
        load_config(None, base + ["parallel.sequence_parallel=true"])
    odd = ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.segment_length=15", "data.n_segments=1"]
    with pytest.raises(ConfigError, match=r"data\.n_segments x model\.segment_length = 15 .* parallel\.tensor \(2\)"):
        load_config(None, base + odd)
    load_config(None, base + odd[:2])
