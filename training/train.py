"""Train an Infini-attention model: ``python -m training.train --config configs/<run>.yaml [key=value ...]``.

Runs as one plain process, under torchrun, or under srun (ranks from SLURM_*). megatron-core holds
the tensor/pipeline layout and runs the microbatch schedule; DeepSpeed reduces gradients over
data-parallel ranks, clips, and steps the optimizer (ZeRO-sharded).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from training.stop import EXIT_STOPPED_TO_RESUME, StopSignals, block_stop_signals, write_outcome

if __name__ == "__main__":
    # The imports below take seconds (tens on a busy node); a USR1 or TERM meanwhile would kill the
    # process. Held pending, it reaches the handlers main() installs.
    block_stop_signals()

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline import SourceConfig, build_train_loader, build_valid_loader
from data_pipeline.make_shards import build_stdlib_shards
from data_pipeline.shards import INDEX_NAME
from modeling.config import build_transformer_config
from modeling.cpu_compat import megatron_on_cpu
from modeling.export import export_model, load_weights_into
from modeling.flops import model_cost
from modeling.init import init_weights
from modeling.model import ModelChunks, build_model
from modeling.weight_gradients import fused_weights, hand_weight_gradients_to_optimizer, start_weight_gradients
from training.build_locks import BuildLockWatch
from training.checkpoint import CheckpointManager, SaveReport, checkpoints_root, clear_for_fresh_start, resume_point
from training.checkpoint_layout import CheckpointError, find_latest_valid
from training.config import ConfigError, TrainConfig, load_config, loader_config, save_resolved, validate
from training.distributed import device, init_distributed, init_model_parallel
from training.garbage_collection import CollectionTimer, freeze_live_objects, unfreeze_objects
from training.memory_state import CarriedMemory
from training.metrics import ConsoleSink, JsonlSink, device_peak_tflops, gate_values, max_over_world
from training.optim import build_engine
from training.step import (
    Microbatch,
    StepResult,
    allreduce_tied_embedding_grads,
    context_share,
    is_finite,
    run_schedule,
    split_microbatches,
)
from training.wandb_sink import open_wandb

COMPILING_STEPS = 2
"""The first step compiles the layers for windows that start with an empty memory, the second for
windows that carry one."""


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything about progress that is not a tensor of the model or optimizer."""

    step: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class WandbRunId:
    """The W&B run this run logs to (None until one is opened): a resumed job continues it."""

    value: Optional[str] = None

    def state_dict(self) -> Optional[str]:
        return self.value

    def load_state_dict(self, state: Optional[str]) -> None:
        self.value = state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available()
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("precision=bf16 needs a GPU; use precision=fp32 (or auto) on the CPU")
    return cfg.precision == "bf16"


def check_gpu_only_settings(cfg: TrainConfig) -> None:
    for key in ("fused_memory_read", "fused_memory_write"):
        if getattr(cfg.performance, key) and not torch.cuda.is_available():
            raise ConfigError(f"performance.{key}=true runs Triton kernels on a GPU; set it to false on the CPU")


def missing_data_path(source: SourceConfig, key: str) -> Optional[str]:
    """Why `source` (config key `key`) cannot be read, or None. A pattern or URL source is read
    through webdataset; only its index must be a local file."""
    if source.index is not None:
        return None if os.path.isfile(source.index) else f"{key}.index: {source.index} does not exist"
    if not os.path.exists(source.path):
        return f"{key}.path: {source.path} does not exist"
    if os.path.isdir(source.path) and not os.path.isfile(os.path.join(source.path, INDEX_NAME)):
        return f"{key}.path: {source.path} holds no {INDEX_NAME} (write one with python -m data_pipeline.make_shards)"
    return None


def prepare_data(cfg: TrainConfig) -> None:
    """Every data source must exist before anything is written; only the built-in python-stdlib
    shards, when asked for and read by a source, are written (by global rank 0, into stdlib_shards_dir)."""
    stdlib_dir = os.path.abspath(cfg.stdlib_shards_dir)
    reads_stdlib = False
    for group in ("sources", "valid_sources"):
        for i, source in enumerate(getattr(cfg.data, group)):
            if cfg.build_stdlib_shards and source.index is None and os.path.abspath(source.path) == stdlib_dir:
                reads_stdlib = True
                continue
            problem = missing_data_path(source, f"data.{group}[{i}]")
            if problem:
                hint = (
                    " (build_stdlib_shards=true writes the built-in shards there)"
                    if (os.path.abspath(source.path) == stdlib_dir)
                    else ""
                )
                raise ConfigError(problem + hint)
    if reads_stdlib:
        if dist.get_rank() == 0 and not os.path.exists(os.path.join(stdlib_dir, INDEX_NAME)):
            build_stdlib_shards(stdlib_dir)
        dist.barrier()


def build_stage_model(cfg: TrainConfig, bf16: bool) -> ModelChunks:
    """This rank's model chunks (parallel.virtual_pipeline of them), their TP shard of every layer."""
    virtual = cfg.parallel.virtual_pipeline
    transformer_config = build_transformer_config(
        cfg.model,
        tensor_parallel_size=cfg.parallel.tensor,
        pipeline_parallel_size=cfg.parallel.pipeline,
        virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # "selective" recomputes megatron's default recompute_modules, ["core_attn"]: the Infini-attention.
        recompute_granularity="full" if cfg.model.recompute else "selective" if cfg.model.recompute_attention else None,
        recompute_method="uniform" if cfg.model.recompute else None,
        recompute_num_layers=1 if cfg.model.recompute else None,
        infini_loss_chunk_tokens=cfg.performance.loss_chunk_tokens,
        infini_compile_loss=cfg.performance.compile_loss,
        infini_half_memory_products=cfg.performance.half_memory_products,
        infini_fused_memory_read=cfg.performance.fused_memory_read,
        infini_fused_memory_write=cfg.performance.fused_memory_write,
        infini_fused_weight_gradients=cfg.performance.fused_weight_gradients,
        # The step's loss function returns per-token sums; the schedule must not average them.
        calculate_per_token_loss=True,
        # p2p's CUDA synchronisation is megatron's default; there is nothing to synchronise on the CPU.
        batch_p2p_sync=torch.cuda.is_available(),
        # Interleaved, a rank sends activations forward and gradients back to the same peer when
        # parallel.pipeline is 2: batched, the two would pair up in posting order, crossed. megatron's
        # separate sends and receives take one of the directions on another group; they overlap with compute.
        batch_p2p_comm=virtual == 1,
        overlap_p2p_comm=virtual > 1,
    )
    chunks = ModelChunks()
    for vp_stage in range(virtual):
        # With tied embeddings over several stages, megatron moves the last stage's copy to CUDA to sync it.
        with megatron_on_cpu():
            chunk = build_model(
                transformer_config,
                cfg.model.padded_vocab_size(cfg.parallel.tensor),
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                tie_embeddings=cfg.model.tie_embeddings,
                rotary_base=cfg.model.rotary_base,
                vp_stage=vp_stage,
            )
        if chunk.share_embeddings_and_output_weights and chunk.post_process and not chunk.pre_process:
            # This stage's output weight is the first stage's embedding: DeepSpeed's gradient norm skips the copy.
            chunk.output_layer.weight.ds_pipe_replicated = True
        chunk = chunk.to(device())
        init_weights(chunk, cfg.seed)
        if cfg.performance.compile_layers:
            for layer in chunk.decoder.layers:
                layer.compile()
        chunks.append(chunk)
    return chunks


class Trainer:
    """The pieces of a run, built in order; ``fit`` is the loop."""

    def __init__(self, cfg: TrainConfig, stop: Optional[StopSignals] = None):
        self.cfg = cfg
        env = init_distributed()
        validate(cfg, env.world_size)
        init_model_parallel(
            cfg.parallel.tensor,
            cfg.parallel.pipeline,
            cfg.seed,
            context_parallel=cfg.parallel.context,
            virtual_pipeline=cfg.parallel.virtual_pipeline,
        )
        seed_everything(cfg.seed)
        self.rank = env.rank
        self.world_size = env.world_size
        self.bf16 = use_bf16(cfg)
        check_gpu_only_settings(cfg)
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.performance.tf32
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.lanes_per_rank = cfg.data.global_lanes // self.dp_size
        self.window = cfg.data.n_segments * cfg.model.segment_length
        self.data_config = loader_config(cfg)

        resume = resume_point(cfg, self.print)
        if resume is None:
            clear_for_fresh_start(cfg, self.print)
        prepare_data(cfg)
        self.model = build_stage_model(cfg, self.bf16)
        if not resume and cfg.checkpoint.init_from:
            # Before the engine: DeepSpeed copies the weights into its fp32 master weights, and its first
            # step writes those back; weights loaded after it would be lost at step 1.
            load_weights_into(self.model, cfg.checkpoint.init_from)
            self.print(f"initialised weights from {cfg.checkpoint.init_from}")
        self.engine = build_engine(self.model, cfg, self.lanes_per_rank, self.bf16)
        self.fused_weights = fused_weights(self.model)
        self.train_loader = build_train_loader(self.data_config, self.dp_rank, self.dp_size)
        if self.train_loader.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's tokenizer "
                f"vocabulary ({self.train_loader.vocab_size})"
            )
        self.num_slots = self.lanes_per_rank // cfg.parallel.micro_batch_lanes
        self.collections = CollectionTimer()
        self.collections.install()
        self.steps_this_process = 0
        self.carried = self.new_carried_memory()
        self.state = TrainState()
        self.wandb_run_id = WandbRunId()
        # main() installs its handlers first thing; fit() installs them for other callers.
        self.stop = stop or StopSignals()
        self.checkpoints = CheckpointManager(
            cfg,
            self.engine,
            self.model,
            self.train_loader.lane_ids,
            {
                "memory": self.carried,
                "data": self.train_loader,
                "train_state": self.state,
                "wandb_run_id": self.wandb_run_id,
            },
            on_save=self.report_checkpoint,
        )
        if resume:
            self.checkpoints.load(resume)
            self.print(f"resumed from {resume.path} at step {self.state.step}")
        self.flops_per_token = model_cost(cfg.model, cfg.parallel.tensor).flops_per_token
        self.peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)
        self.sinks = []
        if self.rank == 0:
            save_resolved(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            metrics = JsonlSink(os.path.join(cfg.run_dir, "metrics.jsonl"), self.state.step)
            if metrics.dropped_rows:
                self.print(
                    f"{metrics.path}: dropped {metrics.dropped_rows} rows past step {self.state.step}, "
                    "where this run starts"
                )
            self.sinks = [ConsoleSink(cfg.logging.interval), metrics]
        # After loading a checkpoint: its run id makes a resumed job continue the same W&B run.
        wandb_sink = open_wandb(cfg, self.rank, self.wandb_run_id.value, gates=lambda: gate_values(self.model))
        if wandb_sink is not None:
            self.sinks.append(wandb_sink)
            self.wandb_run_id.value = wandb_sink.run_id

    def new_carried_memory(self) -> CarriedMemory:
        """Empty memory for every (model chunk, microbatch slot) of this rank."""
        return CarriedMemory(self.num_slots, [len(chunk.layers) for chunk in self.model], device=device())

    def print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def request_stop(self, signum, frame=None) -> None:
        """Stop as on this signal (SIGUSR1 or SIGTERM) at the next step boundary."""
        self.stop.request(signum)

    def past_deadline(self, deadline: float) -> bool:
        """Whether any rank's clock (time.monotonic()) passed ``deadline``. Collective: all ranks stop at the
        same step."""
        flag = torch.tensor([float(time.monotonic() >= deadline)], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def save_checkpoint(self, reason: str) -> None:
        # Only interval saves are asynchronous: the run stops after the others, so a snapshot would
        # only add its copy.
        asynchronous = self.cfg.checkpoint.async_save and reason == "interval"
        self.checkpoints.save(self.state.step, reason, asynchronous=asynchronous)

    def report_checkpoint(self, report: SaveReport) -> None:
        """Called by CheckpointManager when a save is finalized (at a later step, for an asynchronous one)."""
        metrics = report.metrics()
        self.print(
            f"saved checkpoint {report.path} ({report.reason}{', async' if report.asynchronous else ''}): "
            f"{metrics['checkpoint/gb']:.3f} GB written in {report.write_seconds:.2f} s "
            f"({metrics['checkpoint/gb_per_s']:.2f} GB/s), training paused {report.blocking_seconds:.2f} s, "
            f"finalized after {report.seconds:.2f} s"
        )
        if self.rank == 0:
            self.log(metrics)

    def microbatches(self, batch) -> List[Microbatch]:
        """This rank's microbatches of a batch of its data-parallel rank's lanes (its CP share of them)."""
        share = context_share(batch, self.cp_rank, self.cfg.parallel.context)
        return split_microbatches(share, self.cfg.parallel.micro_batch_lanes, device())

    def train_step(self, batch) -> dict:
        cfg = self.cfg
        # gc_s counts the collections inside the step's time only, not those between steps.
        self.collections.take()
        started = time.perf_counter()
        microbatches = self.microbatches(batch)
        self.model.train()
        injected = self.state.step + 1 in cfg.debug.inject_nonfinite_at_steps
        start_weight_gradients(self.fused_weights, cfg.performance.weight_gradient_sum)
        result: StepResult = run_schedule(
            self.model,
            self.carried,
            microbatches,
            forward_only=False,
            loss_scale=float("nan") if injected else 1.0,
            engine=self.engine,
        )
        hand_weight_gradients_to_optimizer(self.fused_weights)
        allreduce_tied_embedding_grads(self.model)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        loss = float("nan") if injected else result.loss
        applied = self.engine.was_step_applied() and is_finite(loss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started

        self.state.step += 1
        tokens = cfg.data.global_lanes * self.window
        self.state.consumed_tokens += tokens
        if applied:
            self.state.consecutive_nonfinite = 0
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_nonfinite += 1
        tokens_per_s = tokens / elapsed
        mfu = (
            self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.world_size)
            if self.peak_tflops
            else None
        )
        metrics = {
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "step_time_s": elapsed,
            "gc_s": self.collections.take(),
            "consumed_tokens": self.state.consumed_tokens,
            "padding_fraction": 1.0 - result.tokens / tokens,
            "skipped_steps": self.state.skipped_steps,
        }
        if self.state.step == 1 or self.state.step % cfg.logging.interval == 0:
            # Collectives over the model-parallel group and the world: only on logging steps.
            gates = gate_values(self.model)
            if gates:
                metrics["gate_mean"] = float(np.mean([v for values in gates.values() for v in values]))
                metrics.update({f"gate/layer_{i}": float(np.mean(v)) for i, v in gates.items()})
            metrics["memory_max_norm"] = max_over_world(self.carried.max_norm())
        if torch.cuda.is_available():
            # One read of the allocator's counters (max_memory_allocated would read them all again).
            allocator = torch.cuda.memory_stats()
            metrics["gpu_memory_gb"] = allocator.get("allocated_bytes.all.peak", 0) / 2**30
            # Since the start: each retry freed the caching allocator's blocks and waited for the GPU to drain.
            metrics["gpu_alloc_retries"] = allocator.get("num_alloc_retries", 0)
        if self.state.consecutive_nonfinite >= cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"stopping at step {self.state.step}: {self.state.consecutive_nonfinite} consecutive steps with a "
                f"non-finite loss or gradient norm (max_nonfinite_steps={cfg.max_nonfinite_steps}); the weights "
                "hold the last finite update"
            )
        return metrics

    @torch.no_grad()
    def validate(self) -> dict:
        loader = build_valid_loader(self.data_config, self.dp_rank, self.dp_size)
        carried = self.new_carried_memory()
        self.model.eval()
        loss_sum, weight, tokens = 0.0, 0.0, 0
        for batch in loader:
            result = run_schedule(self.model, carried, self.microbatches(batch), forward_only=True)
            loss_sum += result.loss_sum
            weight += result.weight
            tokens += result.tokens
        self.model.train()
        loss = loss_sum / weight if weight > 0 else 0.0
        return {"valid/loss": loss, "valid/ppl": float(np.exp(min(loss, 50.0))), "valid/tokens": tokens}

    def log(self, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(self.state.step, metrics)

    def fit(self) -> bool:
        """Train to schedule.steps, or until schedule.max_minutes ran out after a step, then save (checkpoint.
        save_at_end; always after a time budget) and export (export.dir); False when stopped by a signal, after
        saving the last finished step.

        A signal is acted on at the next step boundary (after the step's validation and save, if any),
        where the ranks agree on it; before the first step there is nothing new to save."""
        cfg = self.cfg
        self.stop.install()
        time.sleep(cfg.debug.pause_before_training_s)
        budget = cfg.schedule.max_minutes
        deadline = time.monotonic() + budget * 60.0 if budget is not None else None
        out_of_time = False
        batches = iter(self.train_loader)
        stopped_by = None
        while self.state.step < cfg.schedule.steps:
            stopped_by = self.stop.agreed(device())
            if stopped_by is not None:
                break
            waited = time.perf_counter()
            batch = next(batches)
            # The GPU idles while the host waits here: the previous step ended synchronised.
            data_wait_s = time.perf_counter() - waited
            self.log({**self.train_step(batch), "data_wait_s": data_wait_s})
            self.steps_this_process += 1
            if self.steps_this_process <= COMPILING_STEPS:
                # What compilation built stays alive; full collections need not walk it again.
                freeze_live_objects()
            self.checkpoints.poll()
            if cfg.validation.interval and self.state.step % cfg.validation.interval == 0:
                self.log(self.validate())
            if cfg.checkpoint.interval and self.state.step % cfg.checkpoint.interval == 0:
                self.save_checkpoint("interval")
            if deadline is not None and self.past_deadline(deadline):
                self.print(f"stopped at step {self.state.step}: schedule.max_minutes={budget:g} ran out")
                out_of_time = True
                break
        self.checkpoints.wait()
        if stopped_by is not None:
            name = signal.Signals(stopped_by).name
            if self.state.step == 0:
                self.print(f"stopped on {name} before the first step; nothing to save")
                return False
            # A resumed run saves its start too: it may come from outside this run's checkpoint directory.
            if self.checkpoints.last_saved_step() != self.state.step:
                self.save_checkpoint("signal")
            self.print(f"stopped on {name} at step {self.state.step}, saved; resume with checkpoint.resume=auto")
            return False
        if out_of_time and self.checkpoints.last_saved_step() != self.state.step:
            self.save_checkpoint("time_budget")
        elif cfg.checkpoint.save_at_end and self.checkpoints.last_saved_step() != self.state.step:
            self.save_checkpoint("end")
        if cfg.export.dir:
            export_model(self.model, cfg.model, cfg.export.dir)
            self.print(f"exported {cfg.export.dir}")
        return True

    def close(self) -> None:
        self.collections.remove()
        if self.steps_this_process:
            unfreeze_objects()
        self.checkpoints.close()
        self.train_loader.close()
        for sink in self.sinks:
            sink.close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument(
        "--stopped-exit-code",
        type=int,
        default=EXIT_STOPPED_TO_RESUME,
        help="exit status after a stop on USR1/TERM (default 75). <run_dir>/outcome.json tells "
        "how the run ended; the sbatch script passes 0, since srun --kill-on-bad-exit takes any "
        "other status for a failure",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. schedule.steps=50")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # First: USR1/TERM from here on (held pending since the start when run as a script) stop the run cleanly.
    stop = StopSignals().install()
    args = parse_args(argv)
    try:
        with BuildLockWatch():
            trainer = Trainer(load_config(args.config, args.overrides), stop)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"checkpoint error: {error}", file=sys.stderr)
        return 2
    start_step = trainer.state.step
    try:
        finished = trainer.fit()
        # Before closing (W&B's flush may outlast a KillWait): the checkpoint is final already.
        if trainer.rank == 0:
            write_outcome(
                trainer.cfg.run_dir,
                None if finished else stop.agreed_signal,
                start_step,
                trainer.state.step,
                find_latest_valid(checkpoints_root(trainer.cfg), checksums=False),
            )
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if dist.is_initialized():
        # No rank exits before every rank has saved and closed: a launcher may kill the others at the first exit.
        dist.barrier()
        dist.destroy_process_group()
    return 0 if finished else args.stopped_exit_code


if __name__ == "__main__":
    sys.exit(main())
