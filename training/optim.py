"""Optimizer, learning-rate schedule and the DeepSpeed engine over megatron-core's parallel state."""

from __future__ import annotations

import math

import deepspeed
import torch
from megatron.core import parallel_state

from modeling.layers import is_gate_parameter
from training.config import TrainConfig


class MegatronMpu:
    """The ``mpu`` DeepSpeed expects, answered by megatron-core's parallel_state.

    DeepSpeed shards ZeRO state over the data-parallel group and sums gradient norms over the
    model-parallel group (TP x PP), counting TP-duplicated parameters once. Its data-parallel group is
    megatron's with the context-parallel ranks: a CP rank's gradients hold its share of the window's
    tokens, so they are reduced over DP x CP (as megatron does), and ZeRO shards over those ranks too.
    """

    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)

    @staticmethod
    def get_data_parallel_group():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_rank():
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size():
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    @staticmethod
    def get_model_parallel_rank():
        return torch.distributed.get_rank(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size():
        return torch.distributed.get_world_size(group=parallel_state.get_model_parallel_group())


def parameter_groups(model, cfg: TrainConfig):
    """Weights decay; norms, biases and gates do not; gates have their own learning rate."""
    decay, no_decay, gates = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if is_gate_parameter(param):
            gates.append(param)
        elif param.dim() < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.optimizer.weight_decay, "lr": cfg.optimizer.lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": cfg.optimizer.lr},
        {"name": "gates", "params": gates, "weight_decay": 0.0, "lr": cfg.optimizer.gate_lr},
    ]
    for group in groups:
        # DeepSpeed's elastic ZeRO checkpoints record a per-group "step" (its own Adam keeps one);
        # torch's AdamW counts steps per parameter, restored with the rest of its state.
        group["step"] = 0
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's base LR at a (0-based) step: linear warmup, then decay to min_lr/lr."""
    sched, opt = cfg.schedule, cfg.optimizer
    if sched.warmup_steps and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    floor = opt.min_lr / opt.lr
    span = max(sched.steps - sched.warmup_steps, 1)
    progress = min(max(step - sched.warmup_steps, 0) / span, 1.0)
    if sched.decay == "constant":
        return 1.0
    if sched.decay == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, lanes_per_rank: int, bf16: bool) -> dict:
    return {
        # megatron-core's schedule runs all microbatches of a step; DeepSpeed sees one "micro batch"
        # of all the rank's lanes and reduces, clips and steps once.
        "train_micro_batch_size_per_gpu": lanes_per_rank,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optimizer.grad_clip,
        # Elastic ZeRO-1/2 checkpoints load on another data-parallel size.
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "elastic_checkpoint": cfg.parallel.zero_stage in (1, 2),
        },
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # Its throughput timer synchronises the device at every forward, so the host cannot queue the
        # next microbatch ahead of the GPU; the trainer times steps itself.
        "timers": {"throughput": {"enabled": False}},
    }


def build_engine(model, cfg: TrainConfig, lanes_per_rank: int, bf16: bool):
    groups = parameter_groups(model, cfg)
    optimizer = torch.optim.AdamW(
        groups, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps, fused=torch.cuda.is_available()
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=MegatronMpu(),
        config=deepspeed_config(cfg, lanes_per_rank, bf16),
    )
    return engine
