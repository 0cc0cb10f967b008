"""The run configuration: one structured schema, YAML files composed with CLI overrides.

A run file may name presets to start from, ``defaults: {model: tiny}`` loads
``configs/model/tiny.yaml`` under ``model``; the run file's own keys, then ``key=value`` overrides
from the command line, are merged on top. Unknown keys and ill-typed values fail at load, naming
their path; rules between fields fail in ``validate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline import DataConfig, RunDataConfig
from modeling.config import ModelConfig

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A configuration problem, with the file and key path in the message."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    """Model chunks per pipeline rank: with V > 1 each rank holds V chunks of num_layers / (pipeline x V) layers
    (chunk c of rank p: layers from (c x pipeline + p) x that), run by megatron's interleaved 1F1B schedule. The
    pipeline bubble shrinks by V for V times as many point-to-point transfers; 1: the plain 1F1B schedule."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 1 with pipeline parallelism (parallel.pipeline > 1); 1, 2 or 3 without. (Stage 0
    refuses the backward megatron's schedules run.)"""
    micro_batch_lanes: int = 1
    """Lanes per microbatch; a rank's lanes (global_lanes / dp) run as that many / this microbatches."""
    sequence_parallel: bool = False
    """megatron's sequence parallelism inside the TP group (parallel.tensor > 1): norms and residuals hold
    1/tensor of the window's tokens per rank; the TP all-reduces become all-gathers and reduce-scatters."""
    context: int = 1
    """Context parallelism: each window's segments are split into this many contiguous groups, one per rank
    of a CP group; a rank runs its share of every layer, and only the Infini memory (one all-gather of
    d_k x d_v per KV head and layer) crosses ranks. Needs model.update=linear. Gradients are reduced over
    the data-parallel x context-parallel ranks."""


@dataclass
class PerformanceConfig:
    compile_layers: bool = False
    """torch.compile each transformer layer (GPU runs)."""
    loss_chunk_tokens: int = 0
    """Output layer + cross-entropy in chunks of this many tokens (0: whole window)."""
    compile_loss: bool = False
    """torch.compile the cross-entropy (fused with the logits' upcast); parallel.tensor = 1 only."""
    tf32: bool = True
    """TF32 for float32 matmuls (the Infini memory's reads and writes) on GPUs."""
    half_memory_products: bool = False
    """In bf16 runs the Infini memory's reads and writes take bf16 operands (float32 accumulation);
    the memory is still summed and kept in float32."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    gate_lr: float = 1e-2
    """Learning rate of the Infini-attention gates (no weight decay): they need their own."""
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    steps: int = 200
    warmup_steps: int = 20
    decay: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup, from lr down to min_lr at the last step."""
    max_minutes: Optional[float] = None
    """A time budget for the training loop: when it runs out, every rank stops after the same step, saves a
    checkpoint and the run ends as at its last step (exit status 0, the export written). None: no budget."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Default: <run_dir>/checkpoints."""
    interval: int = 0
    """Save every N steps (0: only at the end and on request)."""
    resume: Optional[str] = None
    """None: start fresh; 'auto': the latest valid checkpoint if any; or a checkpoint path. It may have been
    saved on another TP/PP/DP layout (README: Checkpoints)."""
    keep_last: int = 3
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    save_at_end: bool = True
    init_from: Optional[str] = None
    """An exported model directory (training.export) to start from, on any TP/PP layout; ignored on resume."""
    async_save: bool = False
    """Interval saves pause training only to copy the state to host memory (pinned, on GPUs); a background
    thread per rank writes the files while training continues, and the checkpoint is finalized at the first
    step boundary after every rank's writer is done. Needs host memory for one checkpoint's shards of the rank.
    Saves at the end and on a signal stay synchronous (nothing runs after them); any save first waits for a
    pending one."""


@dataclass
class ExportConfig:
    dir: Optional[str] = None
    """After training (the schedule's last step or schedule.max_minutes), write the final weights here as an
    exported model directory (modeling.export: model.safetensors + model_config.yaml). None: no export."""


@dataclass
class WandbConfig:
    mode: Optional[str] = None
    """'online', 'offline' (files in <run_dir>/wandb, for `wandb sync`) or 'disabled'; None: WANDB_MODE if set,
    else online with WANDB_API_KEY set, else offline."""
    project: str = "infinitron"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    """Default: the run directory's name."""
    tags: List[str] = field(default_factory=list)
    gate_heatmap_interval: int = 100
    """Log the layers x heads image of sigmoid(gate) every N steps (0: never)."""


@dataclass
class LoggingConfig:
    interval: int = 10
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s per device for MFU; None: known GPUs by name (H100/H200: 989)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ValidationConfig:
    interval: int = 0
    """Validate every N steps (0: never)."""
    batches: int = 4
    """Batches per validation pass (0: one full pass over the validation documents)."""


@dataclass
class DebugConfig:
    """Fault injection for tests and drills."""

    inject_nonfinite_at_steps: List[int] = field(default_factory=list)
    """These steps' losses are made NaN."""
    inject_kill_during_save_at_steps: List[int] = field(default_factory=list)
    """Rank 0 kills itself (SIGKILL) midway through these saves (with checkpoint.async_save, its background
    writer does, after writing its first file)."""
    inject_writer_delay_s: float = 0.0
    """The background checkpoint writer sleeps this long before each save."""
    inject_writer_failure_at_steps: List[int] = field(default_factory=list)
    """Rank 0's background checkpoint writer fails on its first file of these saves."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 1234
    precision: str = "auto"
    """'bf16' (fp32 master weights), 'fp32', or 'auto': bf16 on GPUs, fp32 on the CPU."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    build_stdlib_shards: bool = False
    """Write the built-in python-stdlib shards to stdlib_shards_dir when a data source reads that directory and it
    holds no index yet; never into any other path."""
    stdlib_shards_dir: str = "runs/data/python-stdlib"
    """Where the built-in python-stdlib shards are written and read."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RunDataConfig = field(default_factory=RunDataConfig)
    """The window's segment length is model.segment_length; a validation pass's cap is validation.batches."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _load_yaml(path: str) -> DictConfig:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as error:  # yaml's parser errors carry line and column
        raise ConfigError(f"{path}: cannot parse: {error}") from error


# Keys whose value another key holds: a config that sets them is told which.
SET_ELSEWHERE = {
    "data.segment_length": "model.segment_length",
    "data.valid_batches": "validation.batches",
    "inject_nonfinite_at_steps": "debug.inject_nonfinite_at_steps",
    "checkpoint.inject_kill_during_save_at_steps": "debug.inject_kill_during_save_at_steps",
    "checkpoint.inject_writer_delay_s": "debug.inject_writer_delay_s",
    "checkpoint.inject_writer_failure_at_steps": "debug.inject_writer_failure_at_steps",
}


def _merge(schema: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        if key in SET_ELSEWHERE:
            raise ConfigError(f"{source}: {key} is not a key; set {SET_ELSEWHERE[key]}") from error
        raise ConfigError(f"{source}: bad key {key!r}: {error.msg if hasattr(error, 'msg') else error}") from error


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Schema <- presets named in ``defaults`` <- the YAML file <- CLI ``key=value`` overrides."""
    cfg = OmegaConf.structured(TrainConfig)
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as error:
        raise ConfigError(f"command line: cannot parse overrides {list(overrides)}: {error}") from error
    run = _load_yaml(path) if path else OmegaConf.create({})
    defaults = OmegaConf.to_container(run.pop("defaults", OmegaConf.create({})))
    defaults.update(OmegaConf.to_container(cli.pop("defaults", OmegaConf.create({}))))
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must map a group to a preset name, e.g. {{model: tiny}}")
    for group, name in defaults.items():
        preset = os.path.join(CONFIG_ROOT, group, f"{name}.yaml")
        if group not in cfg:
            raise ConfigError(f"{path}: defaults names unknown group {group!r}")
        cfg = _merge(cfg, OmegaConf.create({group: _load_yaml(preset)}), preset)
    cfg = _merge(cfg, run, path or "<no file>")
    cfg = _merge(cfg, cli, "command line")
    try:
        config: TrainConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {error}") from error
    validate(config)
    return config


def validate(cfg: TrainConfig, world_size: Optional[int] = None) -> None:
    """Rules between fields. With world_size, also the parallel layout."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    try:
        cfg.model.validate("model")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    need(cfg.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    par = cfg.parallel
    need(par.tensor >= 1 and par.pipeline >= 1 and par.context >= 1,
         "parallel.tensor, parallel.pipeline and parallel.context must be >= 1")
    need(cfg.data.n_segments % par.context == 0,
         f"data.n_segments ({cfg.data.n_segments}) must be divisible by parallel.context ({par.context}): each "
         "context-parallel rank runs a whole number of a window's segments")
    need(par.context == 1 or cfg.model.update == "linear",
         f"parallel.context={par.context} needs model.update=linear (got {cfg.model.update!r}): the delta update "
         "reads the memory before each write, so context-parallel ranks would have to run one after another")
    need(par.micro_batch_lanes >= 1, "parallel.micro_batch_lanes must be >= 1")
    need(par.zero_stage in (1, 2, 3), f"parallel.zero_stage must be 1, 2 or 3, got {par.zero_stage} (DeepSpeed's "
         "stage 0 refuses the backward that megatron's schedules run)")
    need(par.pipeline == 1 or par.zero_stage == 1,
         f"parallel.zero_stage={par.zero_stage} with parallel.pipeline={par.pipeline}: ZeRO-2 and ZeRO-3 shard "
         "gradients during backward, which pipeline schedules do not allow; use parallel.zero_stage=1 with "
         "pipeline parallelism, or parallel.pipeline=1")
    need(cfg.model.num_layers % par.pipeline == 0,
         f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.pipeline ({par.pipeline})")
    need(par.virtual_pipeline >= 1, f"parallel.virtual_pipeline must be >= 1, got {par.virtual_pipeline}")
    need(par.virtual_pipeline == 1 or par.pipeline > 1,
         f"parallel.virtual_pipeline={par.virtual_pipeline} needs parallel.pipeline > 1: it interleaves model chunks "
         "over the pipeline ranks")
    need(cfg.model.num_layers % (par.pipeline * par.virtual_pipeline) == 0,
         f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.pipeline x parallel.virtual_pipeline "
         f"({par.pipeline} x {par.virtual_pipeline})")
    need(not par.sequence_parallel or par.tensor > 1,
         f"parallel.sequence_parallel needs parallel.tensor > 1 (got {par.tensor}): it splits the sequence over "
         "the tensor-parallel ranks")
    window = cfg.data.n_segments * cfg.model.segment_length
    need(not par.sequence_parallel or (window // par.context) % par.tensor == 0,
         f"parallel.sequence_parallel splits each rank's share of a window, data.n_segments x model.segment_length = "
         f"{window} tokens / parallel.context ({par.context}), over parallel.tensor ({par.tensor}) ranks: it must be "
         "divisible")
    need(cfg.model.num_attention_heads % par.tensor == 0,
         f"model.num_attention_heads ({cfg.model.num_attention_heads}) must be divisible by parallel.tensor ({par.tensor})")
    need(cfg.data.vocab_size in (0, cfg.model.vocab_size),
         f"data.vocab_size ({cfg.data.vocab_size}) must be 0 or model.vocab_size ({cfg.model.vocab_size})")
    need(cfg.schedule.steps >= 1, "schedule.steps must be >= 1")
    need(0 <= cfg.schedule.warmup_steps <= cfg.schedule.steps, "schedule.warmup_steps must be in [0, schedule.steps]")
    need(cfg.schedule.decay in ("cosine", "linear", "constant"),
         f"schedule.decay must be cosine, linear or constant, got {cfg.schedule.decay!r}")
    need(cfg.schedule.max_minutes is None or cfg.schedule.max_minutes > 0,
         f"schedule.max_minutes must be > 0 (or null: no time budget), got {cfg.schedule.max_minutes}")
    need(cfg.optimizer.lr > 0 and cfg.optimizer.gate_lr > 0, "optimizer.lr and optimizer.gate_lr must be > 0")
    need(0 <= cfg.optimizer.min_lr <= cfg.optimizer.lr, "optimizer.min_lr must be in [0, optimizer.lr]")
    need(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1")
    need(cfg.performance.loss_chunk_tokens >= 0, "performance.loss_chunk_tokens must be >= 0")
    need(not (cfg.performance.compile_loss and cfg.parallel.tensor > 1),
         f"performance.compile_loss needs parallel.tensor = 1 (got {cfg.parallel.tensor}): with tensor parallelism "
         "the vocabulary is split and megatron's vocab-parallel cross-entropy is used")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
    need(cfg.validation.batches >= 0, "validation.batches must be >= 0")
    need(cfg.debug.inject_writer_delay_s >= 0, "debug.inject_writer_delay_s must be >= 0")
    mode = cfg.logging.wandb.mode
    need(mode in (None, "online", "offline", "disabled"), f"logging.wandb.mode must be online, offline or disabled, got {mode!r}")
    if world_size is not None:
        model_parallel = par.tensor * par.pipeline * par.context
        need(world_size % model_parallel == 0,
             f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
             f"({model_parallel})")
        dp = world_size // model_parallel
        need(cfg.data.global_lanes % dp == 0,
             f"data.global_lanes ({cfg.data.global_lanes}) must be divisible by the data-parallel size ({dp})")
        need((cfg.data.global_lanes // dp) % par.micro_batch_lanes == 0,
             f"lanes per data-parallel rank ({cfg.data.global_lanes // dp}) must be divisible by "
             f"parallel.micro_batch_lanes ({par.micro_batch_lanes})")
        microbatches = cfg.data.global_lanes // dp // par.micro_batch_lanes
        # megatron's interleaved schedule runs the microbatches in groups of parallel.pipeline per chunk.
        need(par.virtual_pipeline == 1 or microbatches % par.pipeline == 0,
             f"parallel.virtual_pipeline={par.virtual_pipeline} runs the microbatches in groups of parallel.pipeline "
             f"({par.pipeline}): the microbatches per step (data.global_lanes / data-parallel size / "
             f"parallel.micro_batch_lanes = {cfg.data.global_lanes} / {dp} / {par.micro_batch_lanes} = {microbatches}) "
             "must be a multiple of it")


def loader_config(cfg: TrainConfig) -> DataConfig:
    """The data pipeline's configuration of a run: its data section, the model's segment length and the
    validation cap."""
    return DataConfig(**vars(cfg.data), segment_length=cfg.model.segment_length, valid_batches=cfg.validation.batches)


def save_resolved(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
