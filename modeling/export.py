"""A consolidated model directory: ``model.safetensors`` (full TP=1/PP=1 tensors) + ``model_config.yaml``.

``export_model`` gathers a running TP/PP model (collective over all ranks; rank 0 writes).
``load_exported`` builds the model on one device; ``load_weights_into`` fills a model of any layout.
A checkpoint becomes such a directory with ``training.export``'s CLI.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from modeling.config import ModelConfig, build_transformer_config
from modeling.model import build_model
from modeling.sharding import full_state_dict, load_full_state_dict

WEIGHTS = "model.safetensors"
CONFIG = "model_config.yaml"


def export_model(model, model_cfg: ModelConfig, out_dir: str) -> str:
    state = full_state_dict(model)
    # Every stage gathered the same dict; the data-parallel replicas agree, rank 0 writes.
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({k: v.float().contiguous() for k, v in state.items()}, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, CONFIG), "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.structured(model_cfg)))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def read_export(path: str):
    """(ModelConfig, full state dict) of an exported directory, with clear errors."""
    weights, config = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    for required in (weights, config):
        if not os.path.exists(required):
            raise FileNotFoundError(f"exported model incomplete: {required} is missing")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(config)))
    return cfg, load_file(weights)


def load_weights_into(model, path: str) -> None:
    _, state = read_export(path)
    load_full_state_dict(model, {k: v.to(next(model.parameters()).dtype) for k, v in state.items()})


def load_exported(path: str, device="cpu", dtype=torch.float32):
    """(model, ModelConfig) on one device. Needs megatron's parallel state at TP=1, PP=1
    (``training.distributed.init_single_process``)."""
    cfg, state = read_export(path)
    tc = build_transformer_config(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    model = build_model(tc, cfg.padded_vocab_size(), tie_embeddings=cfg.tie_embeddings, rotary_base=cfg.rotary_base)
    load_full_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    return model.to(device).eval(), cfg
