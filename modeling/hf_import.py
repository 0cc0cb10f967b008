"""Import a Hugging Face Llama checkpoint as an Infini-attention model (the paper's continual pretraining).

    python -m modeling.hf_import --hf-dir DIR --out EXPORT_DIR [--segment-length N] [--update linear|delta]
        [--gate-init B] [--learned-memory-scales] [--no-memory] [--make-vocab-size-divisible-by N]

DIR is a ``save_pretrained`` directory of a ``LlamaForCausalLM`` (config.json and *.safetensors, or
pytorch_model*.bin); EXPORT_DIR becomes an exported model (``modeling.export``): model.safetensors
in our full TP=1 naming + model_config.yaml, plus the tokenizer.json if DIR has one. Train from it on
any TP/PP layout with ``checkpoint.init_from=EXPORT_DIR`` (and the model section of the run config
equal to model_config.yaml); the gates have their own learning rate (``optimizer.gate_lr``).

Mapping (``llama_to_infini``): q/k/v_proj are fused into megatron's linear_qkv rows, per KV group
[its query heads, its key head, its value head]; gate_proj/up_proj into linear_fc1 = [gate; up];
RMSNorm eps, RoPE base (non-interleaved rotate-half in both) and tied embeddings carry over; the
vocabulary is padded with zero rows to a multiple of --make-vocab-size-divisible-by. Every gate starts
at --gate-init (default -12: sigmoid = 6e-6), so the model starts as the original inside one segment
and the memory contributes almost nothing until training moves the gates. With --learned-memory-scales
the model learns the memory's read sharpness (``model.learned_memory_scales``); its scales start at 1
(log scales 0), the paper's read. With --no-memory the model has no memory and no gates
(``model.memory=false``): the original with its attention cut into segments, a baseline to continue
pretraining beside the Infini-attention model.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from typing import Dict, Tuple

import torch

from modeling.config import ModelConfig

DEFAULT_GATE_INIT = -12.0


def _config_dict(hf_config) -> dict:
    return dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()


def _rope_base(cfg: dict) -> int:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"RoPE type {kind!r} is not supported (megatron's RoPE here is the default one)")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise ValueError(f"rope_theta {theta} is not an integer (ModelConfig.rotary_base is)")
    return int(theta)


def model_config_from_hf(
    hf_config,
    *,
    segment_length: int = 2048,
    update: str = "linear",
    gate_init: float = DEFAULT_GATE_INIT,
    learned_memory_scales: bool = False,
    memory: bool = True,
    make_vocab_size_divisible_by: int = 128,
) -> ModelConfig:
    cfg = _config_dict(hf_config)
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"only Llama checkpoints are supported, got model_type {cfg.get('model_type')!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: only SwiGLU (silu) is supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("checkpoints with attention or MLP biases are not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    model_cfg = ModelConfig(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        kv_channels=head_dim,
        vocab_size=cfg["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        segment_length=segment_length,
        update=update,
        gate_init=gate_init,
        learned_memory_scales=learned_memory_scales,
        memory=memory,
        rotary_base=_rope_base(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_epsilon=cfg["rms_norm_eps"],
        init_method_std=cfg.get("initializer_range", 0.02),
    )
    model_cfg.validate()
    return model_cfg


def llama_to_infini(
    hf_state_dict: Dict[str, torch.Tensor], hf_config, **options
) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """(ModelConfig, full state dict in our TP=1 naming) of a LlamaForCausalLM state dict and config.

    options: segment_length, update, gate_init, learned_memory_scales, memory, make_vocab_size_divisible_by (see
    model_config_from_hf).
    ``modeling.sharding.load_full_state_dict`` loads the result into any TP/PP split.
    """
    cfg = model_config_from_hf(hf_config, **options)
    hf = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in hf_state_dict.items()}
    h, g, d = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    vocab = cfg.padded_vocab_size()

    def padded(weight):
        return torch.cat([weight, weight.new_zeros(vocab - weight.shape[0], weight.shape[1])])

    state = {
        "embedding.word_embeddings.weight": padded(hf["embed_tokens.weight"]),
        "decoder.final_layernorm.weight": hf["norm.weight"],
    }
    if not cfg.tie_embeddings:
        state["output_layer.weight"] = padded(hf["lm_head.weight"])
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].view(g, h // g * d, -1)
        k = hf[src + "self_attn.k_proj.weight"].view(g, d, -1)
        v = hf[src + "self_attn.v_proj.weight"].view(g, d, -1)
        state[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        state[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        if cfg.memory:
            state[dst + "self_attention.core_attention.gate"] = torch.full((h,), float(cfg.gate_init))
        if cfg.learned_memory_scales:
            state[dst + "self_attention.core_attention.memory_key_log_scale"] = torch.zeros(g)
            state[dst + "self_attention.core_attention.memory_query_log_scale"] = torch.zeros(h)
        state[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        state[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        state[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
        state[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    return cfg, {k: v.contiguous() for k, v in state.items()}


def read_hf_dir(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict) of a save_pretrained directory."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} is missing: not a save_pretrained directory")
    with open(config_path) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    state: Dict[str, torch.Tensor] = {}
    if files:
        for file in files:
            state.update(load_file(file))
    else:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        if not files:
            raise FileNotFoundError(f"{path} holds neither *.safetensors nor pytorch_model*.bin weights")
        for file in files:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return config, state


def write_export(cfg: ModelConfig, state: Dict[str, torch.Tensor], out_dir: str) -> str:
    """The layout ``modeling.export.load_exported`` reads, written atomically (tensors keep their dtype)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from modeling.export import CONFIG, WEIGHTS

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, CONFIG), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modeling.hf_import", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True, metavar="DIR")
    ap.add_argument("--out", required=True, metavar="EXPORT_DIR")
    ap.add_argument("--segment-length", type=int, default=2048)
    ap.add_argument("--update", choices=("linear", "delta"), default="linear")
    ap.add_argument("--gate-init", type=float, default=DEFAULT_GATE_INIT)
    ap.add_argument(
        "--learned-memory-scales",
        action="store_true",
        help="learn per-head memory key and query scales, starting at 1 (model.learned_memory_scales)",
    )
    ap.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="no memory and no gates (model.memory=false): attention inside each segment only",
    )
    ap.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    a = ap.parse_args(argv)
    try:
        hf_config, hf_state = read_hf_dir(a.hf_dir)
        cfg, state = llama_to_infini(
            hf_state,
            hf_config,
            segment_length=a.segment_length,
            update=a.update,
            gate_init=a.gate_init,
            learned_memory_scales=a.learned_memory_scales,
            memory=a.memory,
            make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
        )
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"hf_import: error: {error}", file=sys.stderr)
        return 1
    write_export(cfg, state, a.out)
    tokenizer = os.path.join(a.hf_dir, "tokenizer.json")
    if os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(a.out, "tokenizer.json"))
    params = sum(t.numel() for t in state.values())
    print(
        f"wrote {a.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
        f"({cfg.query_groups} KV groups), vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size()}), "
        f"segment {cfg.segment_length}, {params / 1e6:.1f}M parameters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
