"""What the evaluation and generation CLIs share: loading a model on one device, tokenizers, arguments.

A model is an exported directory (``modeling.export``: model.safetensors + model_config.yaml) or a
trainer checkpoint: a ``step_N`` directory or the checkpoint root (its latest valid step). A
checkpoint of any TP/PP layout is merged into one full state dict from DeepSpeed's per model-parallel
rank module files (ZeRO-3 keeps no weights there: export such runs first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from omegaconf import OmegaConf

from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer
from modeling.config import ModelConfig, build_transformer_config
from modeling.export import CONFIG, WEIGHTS, read_export
from modeling.model import build_model
from modeling.sharding import load_full_state_dict, merge_tensor_parallel, split_chunk_name
from training.checkpoint_layout import SavedCheckpoint, find_step_dir


@dataclass
class Loaded:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: object
    device: torch.device

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="an exported model directory, a checkpoint step_N directory or a checkpoint root",
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="'bytes' or a tokenizer.json (default: DIR/tokenizer.json if present, else bytes)",
    )
    ap.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="weights and activations (memory is float32 either way); auto: bf16 on a GPU",
    )
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--window-segments", type=int, default=16, help="segments per forward call when streaming")
    ap.add_argument(
        "--half-memory-products",
        action="store_true",
        help="the memory's matmuls on bf16 operands as in training with performance.half_memory_products "
        "(needs --dtype bf16; the memory itself stays float32)",
    )
    ap.add_argument(
        "--memory-key-scale",
        type=positive_float,
        default=1.0,
        metavar="C",
        help="write the memory with sigma(C * k) instead of sigma(k), times a model's learned key "
        "scales: above 1 sharpens which tokens a read weighs (docs/long-context.md)",
    )
    ap.add_argument(
        "--memory-query-scale",
        type=positive_float,
        default=1.0,
        metavar="C",
        help="read the memory with sigma(C * q) instead of sigma(q), times a model's learned query "
        "scales: above 1 shrinks the weight of the query's inactive dimensions",
    )
    ablation = ap.add_mutually_exclusive_group()
    ablation.add_argument(
        "--ablate-memory", action="store_true", help="force every gate fully local (the model sees one segment only)"
    )
    ablation.add_argument(
        "--ablate-heads",
        type=parse_heads,
        default=None,
        metavar="L:H,...",
        help="force only these heads' gates local: layer:head pairs counted from 0, as "
        "experiments/memory_read_share.py prints them",
    )


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_heads(text: str) -> List[Tuple[int, int]]:
    """'2:4,5:3' -> [(2, 4), (5, 3)]."""
    heads = []
    for item in text.split(","):
        layer, colon, head = item.strip().partition(":")
        if not (colon and layer.isdigit() and head.isdigit()):
            raise argparse.ArgumentTypeError(f"{item!r} is not a layer:head pair such as 2:4")
        heads.append((int(layer), int(head)))
    return heads


def ablation(args: argparse.Namespace, model: torch.nn.Module):
    """The context --ablate-memory or --ablate-heads asks for; exits naming a head the model lacks."""
    from modeling.streaming import memory_ablated

    if not (args.ablate_memory or args.ablate_heads):
        return contextlib.nullcontext()
    try:
        return memory_ablated(model, args.ablate_heads)
    except ValueError as error:
        raise SystemExit(f"error: {'--ablate-memory' if args.ablate_memory else '--ablate-heads'}: {error}") from None


def decode(tokenizer, ids) -> str:
    """Text of token ids; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
    if isinstance(tokenizer, ByteTokenizer):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    return tokenizer.decode(ids)


def _partition_attributes(cfg: ModelConfig) -> Dict[str, tuple]:
    """(partition_dim, stride) of every TP-split parameter, from a meta-device TP=1 model."""
    with torch.device("meta"):
        model = build_model(
            build_transformer_config(cfg),
            cfg.padded_vocab_size(),
            tie_embeddings=cfg.tie_embeddings,
            rotary_base=cfg.rotary_base,
        )
    return {
        name: (p.partition_dim, getattr(p, "partition_stride", 1))
        for name, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }


def read_checkpoint(step_dir: str):
    """(ModelConfig, full state dict) of a trainer checkpoint of any TP/PP layout (ZeRO 0-2)."""
    saved = SavedCheckpoint(step_dir)
    cfg: ModelConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(saved.config_path()).model)
    )
    tp = saved.layout["tensor"]
    pieces: Dict[str, Dict[int, torch.Tensor]] = {}
    for tensor_rank, pipeline_rank in saved.model_parallel_rank:
        for name, tensor in saved.model_states(tensor_rank, pipeline_rank)["module"].items():
            if tensor is None or name.endswith("_extra_state"):
                continue
            if split_chunk_name(name)[1] == "output_layer.weight" and cfg.tie_embeddings:
                continue  # a last stage's copy of the tied embedding
            name = saved.global_name(name, pipeline_rank, cfg.num_layers, cfg.tie_embeddings)
            pieces.setdefault(name, {})[tensor_rank] = tensor
    split = _partition_attributes(cfg)
    state = {}
    for name, by_rank in pieces.items():
        shards = [by_rank[r] for r in sorted(by_rank)]
        if name in split and tp > 1:
            state[name] = merge_tensor_parallel(shards, *split[name])
        else:
            state[name] = shards[0]
    if any(t.numel() == 0 for t in state.values()):
        raise ValueError(
            f"{step_dir}: the module files hold no weights (ZeRO-3); export the model with "
            "training.export and evaluate the export"
        )
    return cfg, state


def load_model(
    path: str,
    device="cpu",
    dtype=torch.float32,
    half_memory_products: bool = False,
    memory_key_scale: float = 1.0,
    memory_query_scale: float = 1.0,
):
    """(model in eval mode, ModelConfig) on one device from an export or a checkpoint. Needs megatron's
    parallel state at TP = PP = 1 (``training.distributed.init_single_process``)."""
    if os.path.exists(os.path.join(path, WEIGHTS)) and os.path.exists(os.path.join(path, CONFIG)):
        cfg, state = read_export(path)
    else:
        step_dir = find_step_dir(path)
        if step_dir is None:
            raise FileNotFoundError(f"{path} is neither an exported model ({WEIGHTS} + {CONFIG}) nor a checkpoint")
        cfg, state = read_checkpoint(step_dir)
    tc = build_transformer_config(
        cfg,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        infini_half_memory_products=half_memory_products,
        infini_memory_key_scale=memory_key_scale,
        infini_memory_query_scale=memory_query_scale,
    )
    model = build_model(tc, cfg.padded_vocab_size(), tie_embeddings=cfg.tie_embeddings, rotary_base=cfg.rotary_base)
    load_full_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    return model.to(device).eval(), cfg


def load_for_eval(args: argparse.Namespace) -> Loaded:
    """Parallel state for one process, then the model and tokenizer the arguments name."""
    from training.distributed import init_single_process

    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    if args.half_memory_products and dtype != torch.bfloat16:
        raise SystemExit(
            f"error: --half-memory-products needs bf16 weights and activations, got --dtype {args.dtype} on {device}"
        )
    init_single_process()
    model, cfg = load_model(
        args.model, device, dtype, args.half_memory_products, args.memory_key_scale, args.memory_query_scale
    )
    spec = args.tokenizer
    if spec is None:
        bundled = os.path.join(args.model, "tokenizer.json")
        spec = bundled if os.path.exists(bundled) else "bytes"
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the model's ({cfg.vocab_size})")
    return Loaded(model, cfg, tokenizer, device)
