"""Learned memory scales (model.learned_memory_scales): the core module against the float64 reference,
bitwise the paper's read at initialisation, the gates' optimizer group, layout-independent init."""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from tests.distributed import run_distributed
from tests.model.reference import reference_infini_attention
from tests.model.test_infini_attention import G, H, N, make_inputs, make_memory, rel_err
from tests.tolerance import tolerance


def core_module(learned: bool, **config_overrides):
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.layers import InfiniCoreAttention

    config = build_transformer_config(
        ModelConfig(num_attention_heads=H, num_query_groups=G, segment_length=N, learned_memory_scales=learned),
        **config_overrides,
    )
    return InfiniCoreAttention(config, 1, AttnMaskType.causal, "self")


def test_scales_are_per_head_parameters_beside_the_gate():
    module = core_module(True)
    params = dict(module.named_parameters())
    assert set(params) == {"gate", "memory_key_log_scale", "memory_query_log_scale"}
    assert params["memory_key_log_scale"].shape == (G,) and params["memory_query_log_scale"].shape == (H,)
    for param in params.values():
        assert (param.tensor_model_parallel, param.partition_dim, param.partition_stride) == (True, 0, 1)
        assert param.dtype == torch.float32
    assert set(dict(core_module(False).named_parameters())) == {"gate"}


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_learned_scales_times_evaluation_scales_match_float64_reference(update):
    """Values and gradients, those of the log scales included: the memory writes sigma(c_k exp(a) k) and
    is read with sigma(c_q exp(b) q), c the configured evaluation scales."""
    module = core_module(True, infini_update=update, infini_memory_key_scale=1.5, infini_memory_query_scale=0.75)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        module.gate.copy_(torch.randn(H, generator=gen))
        module.memory_key_log_scale.copy_(torch.randn(G, generator=gen) * 0.5)
        module.memory_query_log_scale.copy_(torch.randn(H, generator=gen) * 0.5)
    q, k, v, _ = make_inputs(4)
    memory = make_memory()
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, (M, z) = module(*inputs, memory=memory)

    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    ref_params = {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}
    ref_out, (ref_M, ref_z) = reference_infini_attention(
        *ref_inputs,
        ref_params["gate"],
        tuple(m.double() for m in memory),
        segment_length=N,
        update=update,
        memory_key_scale=1.5 * ref_params["memory_key_log_scale"].exp(),
        memory_query_scale=0.75 * ref_params["memory_query_log_scale"].exp(),
    )
    # float32 against float64: all tokens summed into the memory, then read (forward), and back (gradients).
    forward, backward = tolerance(torch.float32, q.shape[2], depth=2), tolerance(torch.float32, q.shape[2], depth=4)
    assert rel_err(out, ref_out) < forward and rel_err(M, ref_M) < forward and rel_err(z, ref_z) < forward

    probe = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    (ref_out * probe).sum().add((ref_M * 0.3).sum()).backward()
    (out * probe.float()).sum().add((M * 0.3).sum()).backward()
    for got, want in zip(inputs, ref_inputs):
        assert rel_err(got.grad, want.grad) < backward
    for name, param in module.named_parameters():
        assert param.grad.abs().min() > 0, name  # every head's scale is trained
        # A head's scale (and gate) gradient sums over all its lanes, tokens and dimensions.
        assert rel_err(param.grad, ref_params[name].grad) < tolerance(torch.float32, q[:, 0].numel(), depth=4), name


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_gradcheck_float64_through_the_log_scales(update):
    module = core_module(True, infini_update=update, infini_memory_key_scale=1.5).double()
    q, k, v, _ = (x.double().requires_grad_() for x in make_inputs(3))
    memory = tuple(m.double() for m in make_memory())
    log_scales = [(torch.randn(n, dtype=torch.float64) * 0.5).requires_grad_() for n in (G, H)]

    def fn(q, k, v, key_log_scale, query_log_scale):
        params = dict(gate=module.gate, memory_key_log_scale=key_log_scale, memory_query_log_scale=query_log_scale)
        out, new_memory = torch.func.functional_call(module, params, (q, k, v), dict(memory=memory))
        return out, new_memory.M, new_memory.z

    assert torch.autograd.gradcheck(fn, (q, k, v, *log_scales), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    "dtype, half_products", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_scales_of_one_are_the_papers_read_bit_for_bit(dtype, half_products):
    """Switch on at initialisation (scales exactly 1) against switch off: outputs, memories and the
    inputs' gradients equal bitwise."""
    results = []
    for learned in (False, True):
        module = core_module(learned, infini_update="delta", infini_half_memory_products=half_products)
        with torch.no_grad():
            module.gate.copy_(torch.linspace(-2.0, 2.0, H))
        inputs = [x.to(dtype).requires_grad_() for x in make_inputs(4)[:3]]
        out, (M, z) = module(*inputs, memory=make_memory())
        (out.float().square().sum() + M.sum() + z.sum()).backward()
        results.append([out, M, z] + [x.grad for x in inputs] + [module.gate.grad])
    for off, on in zip(*results):
        assert torch.equal(off, on)


def test_optimizer_gives_the_scales_the_gates_learning_rate_and_no_weight_decay():
    from training.config import TrainConfig
    from training.optim import parameter_groups

    cfg = TrainConfig()
    cfg.optimizer.gate_lr, cfg.optimizer.lr, cfg.optimizer.weight_decay = 0.05, 1e-3, 0.1
    module = core_module(True)
    groups = {group["name"]: group for group in parameter_groups(module, cfg)}
    assert set(groups) == {"gates"}
    assert {id(p) for p in groups["gates"]["params"]} == {id(p) for p in module.parameters()}
    assert (groups["gates"]["lr"], groups["gates"]["weight_decay"]) == (0.05, 0.0)


def model_worker(rank, world, tp):
    """A tiny model at seed 7 with and without learned scales: its full weights, logits and gradients."""
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.init import init_weights
    from modeling.model import build_model
    from modeling.sharding import full_state_dict, full_tensors, load_full_state_dict
    from training.distributed import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(tp, 1)
    tokens = torch.randint(0, 200, (2, 3 * N), generator=torch.Generator().manual_seed(0))
    results = {}
    for learned in (False, True):
        cfg = ModelConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=H,
            num_query_groups=G,
            ffn_hidden_size=64,
            segment_length=N,
            learned_memory_scales=learned,
        )
        model = build_model(build_transformer_config(cfg, tensor_parallel_size=tp), cfg.padded_vocab_size(tp))
        init_weights(model, seed=7)
        with megatron_on_cpu():
            loss, _ = model(tokens, labels=tokens)
        loss.sum().backward()
        grads = full_tensors(model, {n: p.grad for n, p in model.named_parameters()})
        results[learned] = dict(weights=full_state_dict(model), grads=grads, loss=loss.detach(), model=model)
    mismatches = []
    for source, target in ((True, False), (False, True)):
        try:
            load_full_state_dict(results[target].pop("model"), results[source]["weights"])
        except KeyError as error:
            mismatches.append(str(error))
    results["mismatches"] = mismatches
    return results


@pytest.fixture(scope="module")
def tp1_models():
    return run_distributed(model_worker, 1, 1)[0]


def test_init_gives_scales_of_exactly_one_and_leaves_every_other_weight_as_without(tp1_models):
    off, on = tp1_models[False], tp1_models[True]
    scales = {n: t for n, t in on["weights"].items() if "log_scale" in n}
    assert sorted(scales) == sorted(
        f"decoder.layers.{i}.self_attention.core_attention.memory_{kind}_log_scale"
        for i in range(2)
        for kind in ("key", "query")
    )
    for name, log_scale in scales.items():
        assert log_scale.shape == ((G,) if "key" in name else (H,))
        assert torch.equal(log_scale.exp(), torch.ones_like(log_scale)), name
    assert on["weights"].keys() - scales.keys() == off["weights"].keys()
    for name, weight in off["weights"].items():
        assert torch.equal(on["weights"][name], weight), name


def test_weights_with_and_without_scales_do_not_load_into_each_other(tp1_models):
    into_plain, into_learned = tp1_models["mismatches"]
    assert "does not have" in into_plain and "memory_key_log_scale" in into_plain
    assert "missing" in into_learned and "log_scale" in into_learned


def test_model_with_scales_of_one_trains_as_the_paper_bit_for_bit(tp1_models):
    off, on = tp1_models[False], tp1_models[True]
    assert torch.equal(on["loss"], off["loss"])
    for name, grad in off["grads"].items():
        assert torch.equal(on["grads"][name], grad), name
    assert all(on["grads"][n].abs().sum() > 0 for n in on["grads"] if "log_scale" in n)


@pytest.mark.slow
def test_tp2_init_and_gradients_equal_tp1(tp1_models):
    """Layout-independent init: at TP2 the full weights, the scales among them, are those of TP1; and
    so are the scales' gradients (each rank owns its heads' scales whole)."""
    tp2 = run_distributed(model_worker, 2, 2)[0][True]
    tp1 = tp1_models[True]
    assert tp2["weights"].keys() == tp1["weights"].keys()
    for name, weight in tp1["weights"].items():
        assert torch.equal(tp2["weights"][name], weight), name
    for name, grad in tp1["grads"].items():
        if "log_scale" in name or name.endswith("gate"):
            torch.testing.assert_close(tp2["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
