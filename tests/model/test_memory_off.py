"""model.memory=false: causal attention inside each segment and nothing else, against a float64
token-by-token reference (values and gradients); no parameters, no state, no memory FLOPs; a segment's
output does not depend on the segments before it."""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from tests.distributed import run_distributed
from tests.model.reference import reference_segment_attention
from tests.model.test_infini_attention import G, H, N, make_inputs, make_memory, rel_err, rope_angles
from tests.tolerance import assert_close, tolerance


def core_module(**model_fields):
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.layers import InfiniCoreAttention

    fields = dict(num_attention_heads=H, num_query_groups=G, segment_length=N, memory=False)
    fields.update(model_fields)
    return InfiniCoreAttention(build_transformer_config(ModelConfig(**fields)), 1, AttnMaskType.causal, "self")


@pytest.mark.parametrize("groups, rope", [(G, True), (H, False)], ids=["GQA-RoPE", "MHA"])
def test_matches_float64_reference_values_and_gradients(groups, rope):
    module = core_module(num_query_groups=groups)
    q, k, v, _ = make_inputs(3, groups=groups)
    angles = rope_angles() if rope else None
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, memory = module(*inputs, rotary_pos_emb=angles)
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_segment_attention(*ref_inputs, segment_length=N, rotary_pos_emb=angles)
    assert memory is None and out.dtype == torch.float32
    # float32 against float64: a softmax over at most N scores of D-dimensional products, and back.
    assert rel_err(out, ref) < tolerance(torch.float32, q.shape[3], depth=2)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (ref * probe).sum().backward()
    (out * probe.float()).sum().backward()
    for got, want in zip(inputs, ref_inputs):
        assert rel_err(got.grad, want.grad) < tolerance(torch.float32, q.shape[3], depth=4)


def test_gradcheck_float64():
    module = core_module().double()
    q, k, v, _ = (x.double().requires_grad_() for x in make_inputs(3))

    def fn(q, k, v):
        return module(q, k, v, rotary_pos_emb=rope_angles().double())[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)


def test_no_gate_no_scales_and_no_memory_in_or_out():
    module = core_module()
    assert not module.has_memory and dict(module.named_parameters()) == {}
    q, k, v, _ = make_inputs(2)
    with pytest.raises(ValueError, match="has no memory"):
        module(q, k, v, memory=make_memory())
    with pytest.raises(ValueError, match=r"tokens \(9\) must be a whole number of segments of 5"):
        module(q[:, :, :9], k[:, :, :9], v[:, :, :9])
    # A reset flag has nothing to empty: the same output with and without.
    reset = torch.tensor([[False, True], [True, False]])
    assert torch.equal(module(q, k, v, reset=reset)[0], module(q, k, v)[0])


def test_learned_memory_scales_without_memory_is_an_error_naming_both_keys():
    from modeling.config import InfiniTransformerConfig, ModelConfig
    from training.config import ConfigError, load_config

    with pytest.raises(
        ValueError, match=r"model\.learned_memory_scales=true needs the memory, but model\.memory=false"
    ):
        ModelConfig(memory=False, learned_memory_scales=True).validate()
    with pytest.raises(ConfigError, match=r"model\.learned_memory_scales.*model\.memory=false"):
        load_config("configs/tiny_cpu.yaml", ["model.memory=false", "model.learned_memory_scales=true"])
    with pytest.raises(ValueError, match="infini_learned_memory_scales needs the memory"):
        InfiniTransformerConfig(
            num_layers=1, hidden_size=8, num_attention_heads=2, infini_memory=False, infini_learned_memory_scales=True
        )


def test_flops_without_memory_are_those_with_it_less_the_memory_terms():
    from modeling.config import ModelConfig
    from modeling.flops import model_cost

    for update in ("linear", "delta"):
        on = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=2, update=update)
        off = ModelConfig(**{**vars(on), "memory": False})
        d, heads, groups = on.head_dim, on.num_attention_heads, on.query_groups
        memory = heads * (2 * d * d + 2 * d) + groups * 2 * d * d * (2 if update == "delta" else 1)
        assert model_cost(on).flops_per_token - model_cost(off).flops_per_token == 3 * on.num_layers * memory
        assert model_cost(on).parameters - model_cost(off).parameters == on.num_layers * heads  # the gates


SEGMENTS = 3


def model_worker(rank, world):
    """A tiny memory-off model: logits of one sequence, of the same with its first two segments changed,
    and of the last segment alone; its weights and those of the same model with the memory, same seed."""
    from dataclasses import replace

    from modeling.config import ModelConfig, build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.init import init_weights
    from modeling.model import build_model
    from training.distributed import init_single_process

    init_single_process()
    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, segment_length=8, memory=False
    )
    model = build_model(build_transformer_config(cfg), cfg.padded_vocab_size()).eval()
    init_weights(model, seed=3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (2, SEGMENTS * 8), generator=gen)
    changed = tokens.clone()
    changed[:, : 2 * 8] = torch.randint(0, 200, (2, 2 * 8), generator=gen)
    with torch.no_grad(), megatron_on_cpu():
        logits, memory = model(tokens)
        changed_logits, _ = model(changed)
        alone, _ = model(tokens[:, 2 * 8 :])
    with_memory = build_model(build_transformer_config(replace(cfg, memory=True)), cfg.padded_vocab_size())
    init_weights(with_memory, seed=3)
    return dict(
        weights=dict(model.named_parameters()),
        weights_with_memory=dict(with_memory.named_parameters()),
        logits=logits,
        changed=changed_logits,
        alone=alone,
        memory=memory,
    )


def test_a_segments_output_does_not_depend_on_earlier_segments():
    r = run_distributed(model_worker, 1)[0]
    last = slice(2 * 8, None)
    assert r["memory"] == [None, None]
    assert not any("core_attention" in name for name in r["weights"])
    # The same seed gives the same weights with the memory, which adds only the gates.
    gates = {name for name in r["weights_with_memory"] if name.endswith("core_attention.gate")}
    assert r["weights_with_memory"].keys() - gates == r["weights"].keys() and len(gates) == 2
    for name, weight in r["weights"].items():
        assert torch.equal(weight, r["weights_with_memory"][name]), name
    assert torch.equal(r["changed"][:, last], r["logits"][:, last])
    assert (r["changed"][:, : 2 * 8] - r["logits"][:, : 2 * 8]).abs().max() > 1e-2  # the change did reach its own
    # The last segment alone: the same values, computed in batches of another shape (MLP width 128, 2 layers).
    assert_close(r["alone"], r["logits"][:, last], torch.float32, 128, 2)
