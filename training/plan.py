"""Layout planner: per-GPU memory and step time of every parallel layout of a model, and the fastest that fits.

    python -m training.plan --model 7b --gpus 64 --gpu-memory-gb 80 [--seq 16384] [--global-lanes 256] [--top 20]

A layout is TP (tensor), SP (sequence parallel, with TP), PP (pipeline stages), V (virtual pipeline
chunks per stage, the interleaved schedule), CP (context parallel: a window's segments split over
ranks), DP (data parallel), the ZeRO stage, recompute (none / selective / full) and the lanes of a
microbatch. Everything here is a pure function of a ``ModelConfig`` and a ``Layout``; parameter counts
and FLOPs come from ``modeling.flops``.

Memory per GPU (the most loaded pipeline stage: the first holds the embedding and the most
microbatches in flight, the last the output layer and the logits):

* Weights, gradients, optimizer state. bf16 (the GPU trainer): bf16 weights (2 bytes) and gradients (2),
  fp32 master weights (4) and Adam's two moments (8): 16 bytes a parameter. fp32 (the CPU trainer):
  fp32 weights (4) and gradients (4), Adam (8) and DeepSpeed's fp32 copy of the partition
  it steps (4). ZeRO-1 shards master weights and Adam state over DP x CP (the trainer's
  optimizer group), ZeRO-2 also the gradients, ZeRO-3 also the weights. Weights split over TP
  (all of them, norms included: a small overcount) and over PP by layers.
* Activations, derived from what the layer's autograd saves (``layer_activation_bytes``; the counts
  were checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on the CPU).
  Megatron-LM's 34 s b h + 5 a s^2 b becomes, per token of one layer: the two norms' inputs (and in
  the CPU's decomposed rms_norm their fp32 normalised outputs) and the QKV and FC1 inputs, which SP
  divides by TP; the rest divided by TP: SDPA's q, k, v (GQA's k and v repeated to every head),
  output and log-sum-exp, whose scores never exist whole (flash/cuDNN), so attention costs no s^2
  term at all, and were it materialised its span would be the segment N, not the window; the
  memory read/write intermediates (sigma(q), sigma(k), v in the memory operand dtype, fp32
  numerator, retrieval and gated local output, and per segment each query head's memory matrix
  M [d_k, d_v] in fp32, which matmul's broadcast materialises); the output projection's input;
  SwiGLU's FC1 output, its two halves' activations and their product. Selective recompute keeps
  only the layer's matmul inputs, norms and q, k, v (the attention internals and memory path are
  recomputed); full recompute keeps each layer's input and rebuilds one layer's activations at a
  time in backward. CP divides a microbatch's tokens by C. Compiled layers (performance.compile_layers):
  torch.compile's partitioner keeps SwiGLU's FC1 output and recomputes the elementwise rest, the
  one difference from the eager count that the GPU peaks show (docs/planner.md).
* Microbatches in flight on the first stage: megatron's warm-up forwards on pipeline rank 0
  (``get_pp_rank_microbatches``) plus the steady state's first forward, which runs before the first
  backward: 1 without PP, min(PP, m) whole stages with 1F1B, and min((V-1) PP + 2 (PP-1) + 1, m V)
  chunks of L / (PP V) layers with the interleaved schedule (V > 1).
* The logits: the output layer and cross-entropy of one microbatch (a chunk of loss_chunk_tokens
  when chunked): megatron's cross-entropy keeps the fp32 softmax, beside which the bf16 logits'
  gradient exists in backward; the compiled loss keeps the bf16 logits and their bf16 gradient.
* Carried Infini memory: per layer of the stage, per lane of the DP rank, per KV group of the TP rank,
  M [d_k, d_v] and z [d_k] in fp32.
* DeepSpeed ZeRO's gradient-reduction bucket: reduce_bucket_size (5e8) elements, fp32 for ZeRO-1 and
  the gradients' dtype for ZeRO-2/3, allocated whatever the model's size.
* Not counted: the CUDA allocator's fragmentation, communication buffers, cuBLAS/cuDNN workspaces,
  torch.compile's own buffers.

Step time, no overlap assumed between compute and communication:

* Compute: training FLOPs per token (``model_cost``) x tokens per GPU / (peak x MFU); the default MFU
  is the one measured for the 1.3B model on one H100 (docs/BENCHMARKS.md: 52% of 989 TFLOP/s).
  Full recompute adds a forward (x 4/3), selective recompute the attention core's forward.
* Pipeline bubble: compute x (PP - 1) / (m V).
* TP: per layer and microbatch, 2 all-reduces of the activations forward and 2 backward (with SP the
  same volume as all-gather + reduce-scatter), ring cost 2 (t-1)/t bytes / NVLink bandwidth.
* DP: gradient reduce-scatter + parameter all-gather over the DP x CP ranks (g of them), 2 (g-1)/g x
  the stage's weights, over the inter-node links (NVLink when the TP x CP x DP block of ranks, in the
  trainer's tp-cp-dp-pp order, fits in a node); ZeRO-3 gathers the weights again in forward and
  backward (1.5x).
* PP: per microbatch and chunk, the activations sent forward and their gradient back.
* CP: per layer and microbatch, an all-gather of each rank's memory update (M and z) forward and a
  reduce-scatter of its gradient backward.

Validity, the rules of ``training.config.validate`` (every layout enumerated is a trainer config):
TP PP CP DP = GPUs; TP divides the heads; ZeRO 1, 2 or 3, and only 1 with PP > 1; PP V divides the
layers, V > 1 needs PP > 1 and the microbatches a multiple of PP (megatron's interleaved schedule);
SP needs TP > 1 and TP dividing a CP rank's share of the window (window / CP tokens); CP divides the
window's segments and needs the linear update; DP divides the global lanes and the micro-batch lanes
divide a DP rank's lanes. Besides those, what megatron and the hardware impose: TP divides the KV groups
and the padded vocabulary and is at most --gpus-per-node.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from omegaconf import OmegaConf

from modeling.config import ModelConfig
from modeling.flops import count_parameters, model_cost
from training.config import CONFIG_ROOT, PerformanceConfig

GIB = 2**30
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp32")
DEFAULT_PEAK_TFLOPS = 989.0
"""Dense bf16 TFLOP/s of an H100/H200 (as training.metrics counts MFU)."""
DEFAULT_MFU = 0.52
"""Measured: the 1.3B model on one H100, compiled, bf16 memory products (docs/BENCHMARKS.md)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    sp: bool = False
    pp: int = 1
    vp: int = 1
    """Virtual pipeline chunks per stage (V)."""
    cp: int = 1
    dp: int = 1
    zero: int = 1
    recompute: str = "none"
    micro_lanes: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def gradient_ranks(self) -> int:
        """The ranks that reduce gradients and shard ZeRO state: DP x CP."""
        return self.dp * self.cp


@dataclass(frozen=True)
class Workload:
    """What a step runs and how: the data shape, precision and the trainer's performance settings."""

    window: int
    """Tokens of one lane's window (segments x segment length)."""
    global_lanes: int
    precision: str = "bf16"
    half_memory_products: bool = False
    loss_chunk_tokens: int = 0
    compile_loss: bool = False
    compile_layers: bool = False


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    mfu: float = DEFAULT_MFU
    nvlink_gbps: float = 360.0
    """Achieved collective bandwidth inside a node, GB/s per GPU."""
    internode_gbps: float = 40.0
    """Achieved bandwidth between nodes, GB/s per GPU (one 400 Gb/s NIC a GPU)."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations_per_microbatch: float
    in_flight: float
    """Microbatches' worth of activations held at the peak (fractional with V > 1)."""
    logits: float
    carried_memory: float
    gradient_bucket: float

    @property
    def activations(self) -> float:
        return self.activations_per_microbatch * self.in_flight

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.carried_memory
            + self.gradient_bucket
        )


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: MemoryEstimate
    step_seconds: float
    tokens_per_second: float
    fits: bool


def activation_bytes(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return 2 if precision == "bf16" else 4


def layer_activation_bytes(
    model: ModelConfig,
    tp: int,
    sp: bool,
    precision: str,
    recompute: str,
    half_memory_products: bool = False,
    compiled: bool = False,
) -> Dict[str, float]:
    """Bytes one layer keeps for backward, per token, on one TP rank, by what keeps them."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    e = activation_bytes(precision)
    fp32 = 4
    operand = e if half_memory_products else fp32  # the memory products' operand dtype
    h, d, n = model.hidden_size, model.head_dim, model.segment_length
    heads, groups = model.num_attention_heads / tp, model.query_groups / tp
    q_width, kv_width, ffn = heads * d, groups * d, model.ffn_size / tp
    sequence_split = tp if sp else 1
    if recompute == "full":
        return {"layer input": h * e / sequence_split}
    # The CPU's rms_norm is decomposed (input and normalised output in fp32); on the GPU it is one
    # kernel that keeps its input. Each norm feeds a linear layer that keeps its own input.
    norm = 2 * h * fp32 + fp32 if precision == "fp32" else h * e + fp32
    terms = {"norms and linear inputs": 2 * (norm + h * e) / sequence_split}
    qkv_output = (q_width + 2 * kv_width) * e
    gqa_query_copy = q_width * e if groups < heads else 0.0  # megatron reshapes grouped queries into a copy
    if operand == e:
        # sigma's cast is a no-op: its ELU keeps views of q, k, v, i.e. the QKV projection's output.
        kept_qkv = qkv_output + gqa_query_copy
    else:
        kept_qkv = (q_width + kv_width) * operand
    terms["attention output projection input"] = q_width * e
    # Eager: FC1's output (2 ffn), SiLU of one half, the other half, their product. Compiled: the
    # partitioner keeps FC1's output and recomputes the elementwise rest in backward.
    terms["swiglu"] = (2 if compiled else 5) * ffn * e
    if recompute == "selective":
        terms["q, k, v (recompute inputs)"] = qkv_output + gqa_query_copy
        return terms
    terms["q, k, v"] = kept_qkv
    terms["local attention (SDPA q, k, v, out, lse)"] = 4 * q_width * e + heads * fp32
    terms["memory operands (sigma(k), v, sigma(q) x2)"] = 2 * kv_width * operand + 2 * q_width * operand
    terms["memory results (numerator, retrieval, gated local)"] = 3 * q_width * fp32 + heads * (fp32 + 1)
    terms["memory state per segment (M, z per query head)"] = heads * (d * d + d) * fp32 / n
    return terms


def microbatches_per_step(layout: Layout, workload: Workload) -> int:
    return workload.global_lanes // layout.dp // layout.micro_lanes


def microbatches_in_flight(layout: Layout, microbatches: int) -> float:
    """Microbatches of a whole stage's activations held on the first stage at the peak: megatron's
    warm-up forwards on pipeline rank 0 and the steady state's first forward, each of one chunk."""
    if layout.pp == 1:
        return 1.0
    if layout.vp == 1:
        return float(min(layout.pp, microbatches))  # PP - 1 warm-up forwards + 1
    warmup = 2 * (layout.pp - 1) + (layout.vp - 1) * layout.pp
    return min(warmup + 1, microbatches * layout.vp) / layout.vp


def state_bytes(model: ModelConfig, layout: Layout, precision: str, stage: str) -> Dict[str, float]:
    """Weights, gradients and optimizer state of one GPU of a stage ('first' or 'last')."""
    total, body = count_parameters(model, layout.tp)
    embedding = (total - body) // (1 if model.tie_embeddings else 2)
    layers = body / layout.pp
    if stage == "first" or layout.pp == 1:
        layers += embedding
    if stage == "last" or layout.pp == 1:
        layers += 0 if model.tie_embeddings and layout.pp == 1 else embedding
    params = layers / layout.tp
    e = activation_bytes(precision)
    optimizer = (4 + 8) * params / layout.gradient_ranks  # fp32 master weights and Adam's moments
    gradients = e * params
    weights = e * params
    if layout.zero >= 2:
        gradients /= layout.gradient_ranks
    if layout.zero >= 3:
        weights /= layout.gradient_ranks
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "parameters": params}


def logits_bytes(model: ModelConfig, layout: Layout, workload: Workload) -> float:
    """Output layer + cross-entropy of one microbatch (one chunk of it when the loss is chunked)."""
    e = activation_bytes(workload.precision)
    tokens = workload.window // layout.cp
    if workload.loss_chunk_tokens:
        tokens = min(tokens, workload.loss_chunk_tokens)
    # megatron's cross-entropy keeps the fp32 softmax (and in bf16 the half-precision logits' gradient
    # exists beside it in backward); the compiled one keeps the bf16 logits and their gradient.
    per_entry = 2 * e if workload.compile_loss else 4 + (e if workload.precision == "bf16" else 0)
    return layout.micro_lanes * tokens * model.padded_vocab_size(layout.tp) / layout.tp * per_entry


REDUCE_BUCKET_ELEMENTS = 5e8
"""DeepSpeed's default zero_optimization.reduce_bucket_size (the trainer does not set it)."""


def gradient_bucket_bytes(layout: Layout, precision: str) -> float:
    """DeepSpeed ZeRO's contiguous gradient-reduction bucket: fp32 for ZeRO-1 (its accumulator), the
    gradients' dtype for ZeRO-2/3."""
    return REDUCE_BUCKET_ELEMENTS * (4 if layout.zero == 1 else activation_bytes(precision))


def carried_memory_bytes(model: ModelConfig, layout: Layout, workload: Workload) -> float:
    """Per layer of the stage, per lane of the DP rank, per KV group of the TP rank: M and z in fp32."""
    d = model.head_dim
    lanes = workload.global_lanes // layout.dp
    return model.num_layers / layout.pp * lanes * model.query_groups / layout.tp * (d * d + d) * 4


def memory_estimate(model: ModelConfig, layout: Layout, workload: Workload) -> MemoryEstimate:
    """The larger of the first and the last stage's totals."""
    tokens = layout.micro_lanes * workload.window / layout.cp
    per_layer = sum(
        layer_activation_bytes(
            model,
            layout.tp,
            layout.sp,
            workload.precision,
            layout.recompute,
            workload.half_memory_products,
            workload.compile_layers,
        ).values()
    )
    layers = model.num_layers / layout.pp
    activations = per_layer * tokens * layers
    if layout.recompute == "full":
        # Backward rebuilds one layer's full set at a time.
        rebuilt = sum(
            layer_activation_bytes(
                model,
                layout.tp,
                layout.sp,
                workload.precision,
                "none",
                workload.half_memory_products,
                workload.compile_layers,
            ).values()
        )
        activations += rebuilt * tokens
    in_flight = microbatches_in_flight(layout, microbatches_per_step(layout, workload))
    carried = carried_memory_bytes(model, layout, workload)
    estimates = []
    for stage in ("first", "last"):
        states = state_bytes(model, layout, workload.precision, stage)
        last = stage == "last" or layout.pp == 1
        estimates.append(
            MemoryEstimate(
                states["weights"],
                states["gradients"],
                states["optimizer"],
                activations,
                in_flight if stage == "first" else 1.0,
                logits_bytes(model, layout, workload) if last else 0.0,
                carried,
                gradient_bucket_bytes(layout, workload.precision),
            )
        )
    return max(estimates, key=lambda m: m.total)


def step_seconds(model: ModelConfig, layout: Layout, workload: Workload, hardware: Hardware) -> float:
    e = activation_bytes(workload.precision)
    cost = model_cost(model, layout.tp)
    tokens_per_gpu = workload.global_lanes * workload.window / layout.gpus
    forward_fraction = 1.0 / 3.0
    extra = 0.0
    if layout.recompute == "full":
        extra = forward_fraction
    elif layout.recompute == "selective":
        d, n, g = model.head_dim, model.segment_length, model.query_groups
        core = (
            2 * 2 * model.num_attention_heads * d * n + model.num_attention_heads * (2 * d * d + 2 * d) + g * 2 * d * d
        )
        extra = model.num_layers * core / (cost.flops_per_token / 3.0) * forward_fraction
    compute = tokens_per_gpu * cost.flops_per_token * (1 + extra) / (hardware.peak_tflops * 1e12 * hardware.mfu)
    microbatches = microbatches_per_step(layout, workload)
    bubble = compute * (layout.pp - 1) / (microbatches * layout.vp)

    nvlink, internode = hardware.nvlink_gbps * 1e9, hardware.internode_gbps * 1e9
    micro_tokens = layout.micro_lanes * workload.window / layout.cp
    activation_message = micro_tokens * model.hidden_size * e
    layers = model.num_layers / layout.pp
    tp_time = 0.0
    if layout.tp > 1:
        collectives = 4 + (2 if layout.recompute == "full" else 0)
        tp_time = collectives * layers * microbatches * 2 * (layout.tp - 1) / layout.tp * activation_message / nvlink
    dp_time = 0.0
    if layout.gradient_ranks > 1:
        weights = state_bytes(model, layout, workload.precision, "first")["parameters"]
        link = nvlink if layout.tp * layout.cp * layout.dp <= hardware.gpus_per_node else internode
        ranks = layout.gradient_ranks
        volume = 2 * (ranks - 1) / ranks * weights * e * (1.5 if layout.zero == 3 else 1.0)
        dp_time = volume / link
    pp_time = 0.0
    if layout.pp > 1:
        link = nvlink if layout.gpus <= hardware.gpus_per_node else internode
        pp_time = 2 * microbatches * layout.vp * activation_message / layout.tp / link
    cp_time = 0.0
    if layout.cp > 1:
        d = model.head_dim
        update = layout.micro_lanes * model.query_groups / layout.tp * (d * d + d) * 4
        link = nvlink if layout.tp * layout.cp <= hardware.gpus_per_node else internode
        cp_time = 2 * model.num_layers / layout.pp * microbatches * (layout.cp - 1) * update / link
    return compute + bubble + tp_time + dp_time + pp_time + cp_time


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def invalid_reason(
    model: ModelConfig, layout: Layout, workload: Workload, gpus: int, gpus_per_node: int
) -> Optional[str]:
    """Why a layout cannot run, or None."""
    segments = workload.window // model.segment_length
    lanes_per_rank = workload.global_lanes // layout.dp if workload.global_lanes % layout.dp == 0 else 0
    cp_share = workload.window // layout.cp
    rules = [
        (layout.gpus == gpus, f"TP x PP x CP x DP = {layout.gpus}, not {gpus} GPUs"),
        (
            model.num_attention_heads % layout.tp == 0,
            f"TP {layout.tp} does not divide {model.num_attention_heads} heads",
        ),
        (model.query_groups % layout.tp == 0, f"TP {layout.tp} does not divide {model.query_groups} KV groups"),
        (layout.tp <= gpus_per_node, f"TP {layout.tp} spans more than a node ({gpus_per_node} GPUs)"),
        (model.padded_vocab_size() % layout.tp == 0, f"TP {layout.tp} does not divide the padded vocabulary"),
        (not layout.sp or layout.tp > 1, "SP needs TP > 1"),
        (
            not layout.sp or cp_share % layout.tp == 0,
            f"SP: TP {layout.tp} does not divide a CP rank's {cp_share} tokens of the window",
        ),
        (
            model.num_layers % (layout.pp * layout.vp) == 0,
            f"PP x V = {layout.pp * layout.vp} does not divide {model.num_layers} layers",
        ),
        (layout.vp == 1 or layout.pp > 1, "V > 1 needs PP > 1"),
        (
            workload.window % model.segment_length == 0 and segments % layout.cp == 0,
            f"CP {layout.cp} does not divide the window's {segments} segments",
        ),
        (
            layout.cp == 1 or model.update == "linear",
            "CP needs the linear update (the delta rule's memory is sequential over segments)",
        ),
        (layout.zero in (1, 2, 3), f"ZeRO-{layout.zero}: the trainer runs stage 1, 2 or 3"),
        (
            layout.zero == 1 or layout.pp == 1,
            f"ZeRO-{layout.zero} with PP {layout.pp} (gradients sharded during a pipeline's backward)",
        ),
        (layout.recompute in RECOMPUTE, f"recompute {layout.recompute!r}"),
        (lanes_per_rank > 0, f"DP {layout.dp} does not divide {workload.global_lanes} global lanes"),
        (
            lanes_per_rank % layout.micro_lanes == 0,
            f"{layout.micro_lanes} lanes a microbatch do not divide {lanes_per_rank} lanes a DP rank",
        ),
    ]
    for ok, reason in rules:
        if not ok:
            return reason
    if layout.vp > 1 and (lanes_per_rank // layout.micro_lanes) % layout.pp:
        return f"V > 1 needs the microbatches ({lanes_per_rank // layout.micro_lanes}) a multiple of PP {layout.pp}"
    return None


def candidate_layouts(gpus: int, micro_lanes: Iterable[int] = (1, 2, 4), vps: Iterable[int] = (1, 2, 4)):
    for tp, pp, cp in itertools.product(_divisors(gpus), repeat=3):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        for sp, vp, zero, recompute, mb in itertools.product((False, True), vps, (1, 2, 3), RECOMPUTE, micro_lanes):
            yield Layout(tp, sp, pp, vp, cp, dp, zero, recompute, mb)


def plan(model: ModelConfig, workload: Workload, gpus: int, hardware: Hardware) -> List[Plan]:
    """Every valid layout, fastest first among those that fit, then those that do not."""
    plans = []
    for layout in candidate_layouts(gpus):
        if invalid_reason(model, layout, workload, gpus, hardware.gpus_per_node):
            continue
        memory = memory_estimate(model, layout, workload)
        seconds = step_seconds(model, layout, workload, hardware)
        plans.append(
            Plan(
                layout,
                memory,
                seconds,
                workload.global_lanes * workload.window / seconds,
                memory.total <= hardware.gpu_memory_gb * 1e9,
            )
        )
    return sorted(plans, key=lambda p: (not p.fits, p.step_seconds, p.memory.total))


def load_model(name_or_path: str) -> ModelConfig:
    """A preset name (configs/model/<name>.yaml) or a YAML path."""
    presets = os.path.join(CONFIG_ROOT, "model")
    path = name_or_path if os.path.exists(name_or_path) else os.path.join(presets, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        raise ValueError(f"--model {name_or_path!r}: neither a file nor a preset in {presets}")
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    model.validate(path)
    return model


def format_table(plans: List[Plan]) -> str:
    header = (
        "| TP | SP | PP | V | CP | DP | ZeRO | recompute | mb lanes | weights | grads | optim "
        "| act/mb x in flight | logits | carried mem | ZeRO bucket | total GiB | step s | tokens/s | fits |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for p in plans:
        lay, mem = p.layout, p.memory
        lines.append(
            f"| {lay.tp} | {'yes' if lay.sp else 'no'} | {lay.pp} | {lay.vp} | {lay.cp} | {lay.dp} | {lay.zero} "
            f"| {lay.recompute} | {lay.micro_lanes} | {mem.weights / GIB:.1f} | {mem.gradients / GIB:.1f} "
            f"| {mem.optimizer / GIB:.1f} | {mem.activations_per_microbatch / GIB:.1f} x {mem.in_flight:g} "
            f"| {mem.logits / GIB:.1f} | {mem.carried_memory / GIB:.2f} | {mem.gradient_bucket / GIB:.1f} "
            f"| {mem.total / GIB:.1f} "
            f"| {p.step_seconds:.2f} | {p.tokens_per_second:,.0f} | {'yes' if p.fits else 'no'} |"
        )
    return "\n".join(lines)


def gpu_performance() -> PerformanceConfig:
    """The speed settings of the GPU run configs (configs/performance/gpu.yaml): the CLI's defaults."""
    path = os.path.join(CONFIG_ROOT, "performance", "gpu.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PerformanceConfig), OmegaConf.load(path)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="preset name (configs/model/<name>.yaml) or a model YAML")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="usable memory per GPU, GB (1e9 bytes)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--segment-length", type=int, help="tokens a segment (default: the preset's)")
    parser.add_argument("--seq", type=int, help="tokens a window (default: 8 segments)")
    parser.add_argument("--global-lanes", type=int, help="lanes a step (default: 4 per GPU)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16",
        help="bf16: the GPU trainer (16 bytes a parameter); fp32: the CPU trainer",
    )
    # The speed settings default to the GPU run configs' (configs/performance/gpu.yaml).
    gpu = gpu_performance()
    for key in ("half_memory_products", "compile_loss", "compile_layers"):
        on = getattr(gpu, key)
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            action=argparse.BooleanOptionalAction,
            default=on,
            help=f"performance.{key} (default {'on' if on else 'off'}, as configs/performance/gpu.yaml)",
        )
    parser.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=gpu.loss_chunk_tokens,
        help=f"performance.loss_chunk_tokens (default {gpu.loss_chunk_tokens}, as configs/performance/gpu.yaml)",
    )
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="achieved fraction of peak on compute")
    parser.add_argument("--nvlink-gbps", type=float, default=Hardware.nvlink_gbps)
    parser.add_argument("--internode-gbps", type=float, default=Hardware.internode_gbps)
    parser.add_argument("--top", type=int, default=20, help="rows to print")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.segment_length:
        model.segment_length = args.segment_length
    window = args.seq or 8 * model.segment_length
    if window % model.segment_length:
        print(f"error: --seq {window} is not a whole number of segments of {model.segment_length}", file=sys.stderr)
        return 2
    workload = Workload(
        window,
        args.global_lanes or 4 * args.gpus,
        args.precision,
        args.half_memory_products,
        args.loss_chunk_tokens,
        args.compile_loss,
        args.compile_layers,
    )
    hardware = Hardware(
        args.gpu_memory_gb, args.gpus_per_node, args.peak_tflops, args.mfu, args.nvlink_gbps, args.internode_gbps
    )
    plans = plan(model, workload, args.gpus, hardware)
    total, _ = count_parameters(model)
    print(
        f"{args.model}: {total / 1e9:.2f}B parameters, {args.gpus} GPUs of {args.gpu_memory_gb:g} GB, window "
        f"{window} tokens ({window // model.segment_length} segments of {model.segment_length}), "
        f"{workload.global_lanes} lanes a step, {args.precision}; {len(plans)} valid layouts"
    )
    print(format_table(plans[: args.top]))
    fitting = [p for p in plans if p.fits]
    if not fitting:
        print(
            f"recommendation: none fits in {args.gpu_memory_gb:g} GB; the smallest needs "
            f"{min(p.memory.total for p in plans) / 1e9:.1f} GB"
            if plans
            else "recommendation: no valid layout"
        )
        return 1
    best = fitting[0].layout
    print(
        f"recommendation: TP {best.tp}{' + SP' if best.sp else ''}, PP {best.pp}, V {best.vp}, CP {best.cp}, "
        f"DP {best.dp}, ZeRO-{best.zero}, recompute {best.recompute}, {best.micro_lanes} lanes a microbatch: "
        f"{fitting[0].memory.total / GIB:.1f} GiB, {fitting[0].step_seconds:.2f} s a step, "
        f"{fitting[0].tokens_per_second:,.0f} tokens/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
