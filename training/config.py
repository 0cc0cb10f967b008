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
from modeling.weight_gradients import WEIGHT_GRADIENT_SUMS

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
    """torch.compile the (vocab-parallel) cross-entropy: fused with the logits' upcast, no fp32 softmax kept."""
    tf32: bool = True
    """TF32 for float32 matmuls (the Infini memory's reads and writes) on GPUs."""
    half_memory_products: bool = False
    """In bf16 runs the Infini memory's reads and writes take bf16 operands (float32 accumulation);
    the memory is still summed and kept in float32."""
    fused_memory_read: bool = False
    """The Infini memory's read and gate mix as fused Triton kernels (CUDA only): no float32 per-token
    intermediates between them."""
    fused_memory_write: bool = False
    """The Infini memory's write (linear or delta) as fused Triton kernels (CUDA only): no float32 copies of
    sigma(k) per token; not with parallel.context > 1."""
    fused_weight_gradients: bool = False
    """The transformer layers' weight gradients summed over a step's microbatches inside their GEMMs
    (modeling/weight_gradients.py), not by autograd's separate adds; ZeRO stage 1 only."""
    weight_gradient_sum: str = "float32"
    """With fused_weight_gradients, the dtype of those sums: 'float32', or 'weight' (the weights' own: bf16
    in bf16 runs, as autograd sums, with one rounding a microbatch instead of two)."""


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
    """Clip the global gradient norm to this (0: no clipping)."""


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
    """None: start fresh; 'auto': the newest checkpoint in the checkpoint directory that verifies (each one
    skipped is named with the reason; none at all: start fresh); or a checkpoint path. It may have been saved on
    another TP/PP/DP layout (docs/checkpoints.md)."""
    start_over: bool = False
    """A fresh run (no checkpoint.resume) refuses to start in a checkpoint directory that holds checkpoints;
    true removes them first (and the run's metrics.jsonl starts over with them)."""
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
    pause_before_training_s: float = 0.0
    """Every rank waits this long, its stop handlers installed, before the first step: a drill of a stop
    during start-up."""


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


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: ``low <= value`` (``<`` when low_open), ``value <= high`` (``<`` when
    high_open); None: no bound on that side."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: Optional[float]) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION = Range(0), Range(1), Range(0, low_open=True), Range(0, 1, high_open=True)

NUMERIC_RANGES = {
    "seed": Range(0, 2**32 - 1),  # numpy's seed range
    "max_nonfinite_steps": AT_LEAST_1,
    "data.valid_fraction": FRACTION,
    "data.global_lanes": AT_LEAST_1,
    "data.n_segments": AT_LEAST_1,
    "data.seed": AT_LEAST_0,
    "data.num_workers": AT_LEAST_0,
    "data.prefetch": AT_LEAST_1,
    "data.worker_timeout_s": POSITIVE,
    "data.shuffle_buffer": AT_LEAST_1,
    "data.min_doc_tokens": AT_LEAST_0,
    "data.max_doc_tokens": AT_LEAST_0,
    "data.vocab_size": AT_LEAST_0,
    "parallel.tensor": AT_LEAST_1,
    "parallel.pipeline": AT_LEAST_1,
    "parallel.virtual_pipeline": AT_LEAST_1,
    "parallel.context": AT_LEAST_1,
    "parallel.micro_batch_lanes": AT_LEAST_1,
    "optimizer.lr": POSITIVE,
    "optimizer.min_lr": AT_LEAST_0,
    "optimizer.weight_decay": AT_LEAST_0,
    "optimizer.beta1": FRACTION,
    "optimizer.beta2": FRACTION,
    "optimizer.eps": POSITIVE,
    "optimizer.gate_lr": POSITIVE,
    "optimizer.grad_clip": AT_LEAST_0,
    "schedule.steps": AT_LEAST_1,
    "schedule.warmup_steps": AT_LEAST_0,
    "schedule.max_minutes": POSITIVE,
    "checkpoint.interval": AT_LEAST_0,
    "checkpoint.keep_last": AT_LEAST_1,
    "checkpoint.keep_every": AT_LEAST_0,
    "logging.interval": AT_LEAST_1,
    "logging.peak_tflops": POSITIVE,
    "logging.wandb.gate_heatmap_interval": AT_LEAST_0,
    "validation.interval": AT_LEAST_0,
    "validation.batches": AT_LEAST_0,
    "performance.loss_chunk_tokens": AT_LEAST_0,
    "debug.inject_writer_delay_s": AT_LEAST_0,
    "debug.pause_before_training_s": AT_LEAST_0,
}
"""Every numeric key of the schema outside ``model`` (ModelConfig.validate checks its own) but
parallel.zero_stage (a choice, with its own rule below); an optional one may also be null."""

STEP_LISTS = [
    "debug.inject_nonfinite_at_steps",
    "debug.inject_kill_during_save_at_steps",
    "debug.inject_writer_failure_at_steps",
]


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig, world_size: Optional[int] = None) -> None:
    """Each numeric key's range, then rules between fields. With world_size, also the parallel layout."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    for key, allowed in NUMERIC_RANGES.items():
        value = _value(cfg, key)
        need(value is None or allowed.holds(value), f"{key} must be {allowed}, got {value}")
    for key in STEP_LISTS:
        need(all(step >= 1 for step in _value(cfg, key)), f"{key} must hold steps >= 1, got {_value(cfg, key)}")
    for group in ("sources", "valid_sources"):
        for index, source in enumerate(getattr(cfg.data, group)):
            need(source.weight > 0, f"data.{group}[{index}].weight must be > 0, got {source.weight}")
    try:
        cfg.model.validate("model")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    need(cfg.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    par = cfg.parallel
    need(
        cfg.data.n_segments % par.context == 0,
        f"data.n_segments ({cfg.data.n_segments}) must be divisible by parallel.context ({par.context}): each "
        "context-parallel rank runs a whole number of a window's segments",
    )
    need(
        par.context == 1 or cfg.model.update == "linear",
        f"parallel.context={par.context} needs model.update=linear (got {cfg.model.update!r}): the delta update "
        "reads the memory before each write, so context-parallel ranks would have to run one after another",
    )
    need(
        par.context == 1 or not cfg.performance.fused_memory_write,
        f"parallel.context={par.context} with performance.fused_memory_write=true: the fused write runs a rank's "
        "segments alone, while with context parallelism the memory before them comes from the other ranks; set "
        "performance.fused_memory_write=false or parallel.context=1",
    )
    need(
        cfg.performance.weight_gradient_sum in WEIGHT_GRADIENT_SUMS,
        f"performance.weight_gradient_sum must be one of {', '.join(WEIGHT_GRADIENT_SUMS)}, "
        f"got {cfg.performance.weight_gradient_sum!r}",
    )
    need(
        par.zero_stage == 1 or not cfg.performance.fused_weight_gradients,
        f"parallel.zero_stage={par.zero_stage} with performance.fused_weight_gradients=true: ZeRO-2/3 reduce "
        "gradients in hooks during backward, which the fused weight gradients (summed outside autograd until "
        "the step) never reach; set performance.fused_weight_gradients=false or parallel.zero_stage=1",
    )
    need(
        par.zero_stage in (1, 2, 3),
        f"parallel.zero_stage must be 1, 2 or 3, got {par.zero_stage} (DeepSpeed's "
        "stage 0 refuses the backward that megatron's schedules run)",
    )
    need(
        par.pipeline == 1 or par.zero_stage == 1,
        f"parallel.zero_stage={par.zero_stage} with parallel.pipeline={par.pipeline}: ZeRO-2 and ZeRO-3 shard "
        "gradients during backward, which pipeline schedules do not allow; use parallel.zero_stage=1 with "
        "pipeline parallelism, or parallel.pipeline=1",
    )
    need(
        cfg.model.num_layers % par.pipeline == 0,
        f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.pipeline ({par.pipeline})",
    )
    need(
        par.virtual_pipeline == 1 or par.pipeline > 1,
        f"parallel.virtual_pipeline={par.virtual_pipeline} needs parallel.pipeline > 1: it interleaves model chunks "
        "over the pipeline ranks",
    )
    need(
        cfg.model.num_layers % (par.pipeline * par.virtual_pipeline) == 0,
        f"model.num_layers ({cfg.model.num_layers}) must be divisible by parallel.pipeline x parallel.virtual_pipeline "
        f"({par.pipeline} x {par.virtual_pipeline})",
    )
    need(
        not par.sequence_parallel or par.tensor > 1,
        f"parallel.sequence_parallel needs parallel.tensor > 1 (got {par.tensor}): it splits the sequence over "
        "the tensor-parallel ranks",
    )
    window = cfg.data.n_segments * cfg.model.segment_length
    need(
        not par.sequence_parallel or (window // par.context) % par.tensor == 0,
        f"parallel.sequence_parallel splits each rank's share of a window, data.n_segments x model.segment_length = "
        f"{window} tokens / parallel.context ({par.context}), over parallel.tensor ({par.tensor}) ranks: it must be "
        "divisible",
    )
    need(
        cfg.model.num_attention_heads % par.tensor == 0,
        f"model.num_attention_heads ({cfg.model.num_attention_heads}) must be divisible by "
        f"parallel.tensor ({par.tensor})",
    )
    need(
        cfg.data.vocab_size in (0, cfg.model.vocab_size),
        f"data.vocab_size ({cfg.data.vocab_size}) must be 0 or model.vocab_size ({cfg.model.vocab_size})",
    )
    need(
        cfg.schedule.warmup_steps <= cfg.schedule.steps,
        f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) must be at most schedule.steps ({cfg.schedule.steps})",
    )
    need(
        cfg.schedule.decay in ("cosine", "linear", "constant"),
        f"schedule.decay must be cosine, linear or constant, got {cfg.schedule.decay!r}",
    )
    need(
        cfg.optimizer.min_lr <= cfg.optimizer.lr,
        f"optimizer.min_lr ({cfg.optimizer.min_lr}) must be at most optimizer.lr ({cfg.optimizer.lr})",
    )
    need(
        cfg.data.max_doc_tokens == 0 or cfg.data.max_doc_tokens >= cfg.data.min_doc_tokens,
        f"data.max_doc_tokens ({cfg.data.max_doc_tokens}) must be 0 (no limit) or at least data.min_doc_tokens "
        f"({cfg.data.min_doc_tokens})",
    )
    need(
        cfg.data.on_bad_sample in ("error", "skip"),
        f"data.on_bad_sample must be error or skip, got {cfg.data.on_bad_sample!r}",
    )
    need(
        not (cfg.checkpoint.start_over and cfg.checkpoint.resume is not None),
        f"checkpoint.start_over=true starts the run afresh; it contradicts checkpoint.resume={cfg.checkpoint.resume}",
    )
    mode = cfg.logging.wandb.mode
    need(
        mode in (None, "online", "offline", "disabled"),
        f"logging.wandb.mode must be online, offline or disabled, got {mode!r}",
    )
    if world_size is not None:
        model_parallel = par.tensor * par.pipeline * par.context
        need(
            world_size % model_parallel == 0,
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
            f"({model_parallel})",
        )
        dp = world_size // model_parallel
        need(
            cfg.data.global_lanes % dp == 0,
            f"data.global_lanes ({cfg.data.global_lanes}) must be divisible by the data-parallel size ({dp})",
        )
        need(
            (cfg.data.global_lanes // dp) % par.micro_batch_lanes == 0,
            f"lanes per data-parallel rank ({cfg.data.global_lanes // dp}) must be divisible by "
            f"parallel.micro_batch_lanes ({par.micro_batch_lanes})",
        )
        microbatches = cfg.data.global_lanes // dp // par.micro_batch_lanes
        # megatron's interleaved schedule runs the microbatches in groups of parallel.pipeline per chunk.
        need(
            par.virtual_pipeline == 1 or microbatches % par.pipeline == 0,
            f"parallel.virtual_pipeline={par.virtual_pipeline} runs the microbatches in groups of parallel.pipeline "
            f"({par.pipeline}): the microbatches per step (data.global_lanes / data-parallel size / "
            f"parallel.micro_batch_lanes = {cfg.data.global_lanes} / {dp} / {par.micro_batch_lanes} = {microbatches}) "
            "must be a multiple of it",
        )


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
