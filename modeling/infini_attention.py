"""Infini-attention as a pure function (Munkhdalai et al. 2024, arXiv 2404.07143).

The input of one call is cut into segments of ``segment_length`` tokens. Inside a segment: causal
softmax attention (RoPE applied here only). Across segments: per KV head a compressive memory
``M`` [d_k, d_v] and normaliser ``z`` [d_k], kept in float32, read and written through
sigma = ELU + 1 of the *un-rotated* queries and keys. Segment s first reads

    A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})        (an empty memory reads as zeros)

then writes (linear)  M_s = M_{s-1} + sigma(K)^T V
          or (delta)  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
and z_s = z_{s-1} + sum_t sigma(K_t). The output mixes both per head with g = sigmoid(beta):
g * A_mem + (1 - g) * A_dot. Optional memory scales c_k and c_q write sigma(c_k K) and read with
sigma(c_q Q) in place of sigma(K) and sigma(Q) (1, the default, is the paper): one number for every
head, or one per KV head (c_k) and per query head (c_q), e.g. the core module's learned scales.

Tensor parallelism only changes which heads a rank sees. With context parallelism (``context_group``)
this call runs one rank's contiguous share of a window's segments, and the memory before its first
segment comes from the other ranks (modeling/context_parallel.py): its only use of torch.distributed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from modeling.context_parallel import exchange_memory
from modeling.memory import UPDATE_RULES, InfiniMemory, empty_memory, exclusive_cumsum_with_resets, memory_dtype

# cuDNN attention measured ~1.7x the flash backend on H100 (fwd+bwd, S=2048, head dim 128); the others are fallbacks.
_CUDA_SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def sigma(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The paper's non-negative feature map ELU + 1, in `dtype` (default: the memory dtype)."""
    return F.elu(x.to(dtype or memory_dtype(x.dtype))) + 1.0


def scaled_sigma(x: torch.Tensor, scale, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """sigma(scale * x) in `dtype`: scale is a number, or a tensor with one entry per head of x [b, heads, ...].

    A per-head scale multiplies in the memory dtype, so a learned scale is not rounded to a half
    input dtype; x * 1 is exact, so scales of exactly 1 give sigma(x) bit for bit.
    """
    if isinstance(scale, torch.Tensor):
        work = memory_dtype(x.dtype)
        x = x.to(work) * scale.to(work).view(-1, *([1] * (x.dim() - 2)))
    elif scale != 1.0:
        x = x * scale
    return sigma(x, dtype)


def retrieve(sigma_q: torch.Tensor, M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sigma(q) M / (sigma(q) z) over the last two dims, in M's dtype; zeros where the memory is empty.

    With sigma_q in a half dtype the two products take half operands (M and z rounded to it) and
    accumulate in float32 (cuBLAS); the memory itself stays in its float32.
    sigma > 0, so the denominator is 0 exactly when z is (nothing written yet); a safe denominator
    of 1 there keeps values and gradients finite while the numerator is exactly 0.
    """
    numerator = (sigma_q @ M.to(sigma_q.dtype)).to(M.dtype)
    denominator = (sigma_q @ z.to(sigma_q.dtype).unsqueeze(-1)).to(M.dtype)
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / denominator


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron-core's non-interleaved RoPE: x * cos + rotate_half(x) * sin on the first rot_dim channels.

    freqs: angles [n, rot_dim] (or megatron's [n, 1, 1, rot_dim]) for the n positions of the last-but-one
    dim of x.
    """
    freqs = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    rot_dim = freqs.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def spans_ranks(context_group) -> bool:
    return context_group is not None and context_group.size() > 1


def check_whole_segments(tokens: int, segment_length: int) -> None:
    if segment_length <= 0 or tokens % segment_length:
        raise ValueError(
            f"tokens ({tokens}) must be a whole number of segments of {segment_length}: segment_length "
            f"({segment_length}) must be positive and divide them"
        )


def _check_inputs(q, k, v, gate, memory, segment_length, update, reset, scales, context_group, fused_memory_write):
    if update not in UPDATE_RULES:
        raise ValueError(f"update rule must be one of {UPDATE_RULES}, got {update!r}")
    if fused_memory_write and spans_ranks(context_group):
        raise ValueError(
            "fused_memory_write (performance.fused_memory_write) writes the memory of the segments it is given "
            "alone; with context parallelism (a context_group of several ranks) the memory before a rank's "
            "segments comes from the other ranks: use the eager write"
        )
    if update == "delta" and spans_ranks(context_group):
        raise ValueError(
            "the delta update reads M_{s-1} before each write, so context-parallel ranks would have "
            "to run one after another; context parallelism needs the linear update"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, tokens, head_dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    if k.shape[:2] != v.shape[:2] or k.shape[0] != b or k.shape[2] != t or v.shape[2] != t or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree in batch, tokens and key dim"
        )
    g = k.shape[1]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    check_whole_segments(t, segment_length)
    if gate.shape != (h,):
        raise ValueError(f"gate must have shape ({h},) (one per query head), got {tuple(gate.shape)}")
    for (name, scale), heads in zip(scales.items(), (g, h)):
        if isinstance(scale, torch.Tensor):
            # Positive by construction (the core module's exp of a log scale): no device sync to check.
            if scale.shape != (heads,):
                raise ValueError(f"{name} must be a number or have shape ({heads},), got {tuple(scale.shape)}")
        elif not scale > 0:
            raise ValueError(f"{name} must be > 0, got {scale}")
    if memory is not None:
        M, z = memory
        want_M, want_z = (b, g, d, v.shape[3]), (b, g, d)
        if tuple(M.shape) != want_M or tuple(z.shape) != want_z:
            raise ValueError(
                f"memory shapes M {tuple(M.shape)}, z {tuple(z.shape)} do not match expected {want_M}, {want_z}"
            )
        want = memory_dtype(q.dtype)
        if M.dtype != want or z.dtype != want:
            raise ValueError(f"memory must be {want} for {q.dtype} inputs, got M {M.dtype}, z {z.dtype}")
    n_segments = t // segment_length
    if reset is not None and tuple(reset.shape) != (b, n_segments):
        raise ValueError(f"reset must have shape ({b}, {n_segments}), got {tuple(reset.shape)}")


def _causal_sdpa(q, k, v):
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def local_attention(q, k, v, segment_length, rotary_pos_emb=None):
    """Causal softmax attention inside each segment: all segments in one SDPA call.

    Segments are folded into SDPA's batch: [b, h, t, d] -> [b * s, h, n, d]. For one sequence
    (b = 1) that is a strided view of megatron's [t, b, h, d] activations, with no copy.
    """
    b, h, t, d = q.shape
    g, dv = k.shape[1], v.shape[3]
    s, n = t // segment_length, segment_length
    q, k, v = q.reshape(b, h, s, n, d), k.reshape(b, g, s, n, d), v.reshape(b, g, s, n, dv)
    if rotary_pos_emb is not None:
        q, k = apply_rotary(q, rotary_pos_emb), apply_rotary(k, rotary_pos_emb)
    if g != h:
        k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)

    def fold(x):
        return x.transpose(1, 2).reshape(b * s, h, n, x.shape[-1])

    out = _causal_sdpa(fold(q), fold(k), fold(v))
    return out.reshape(b, s, h, n, dv).transpose(1, 2).reshape(b, h, t, dv)


def _memories_before_segments(sk, v, memory, reset, update, state_dtype, context_group=None):
    """M_{s-1}, z_{s-1} for every segment s, and the memory after the last one.

    sk: sigma(K) [b, g, s, n, d]; v: [b, g, s, n, dv], both in the products' operand dtype; the
    memory and its updates are summed in state_dtype. With context parallelism (linear update only)
    the segments are this rank's share of the window, ``memory`` the memory at the window's start,
    and the final memory the one after the window's last segment (on every rank).
    Returns M_before [b, g, s, d, dv], z_before [b, g, s, d], final InfiniMemory.
    modeling.memory_kernels.memory_write computes the same without context parallelism in fused kernels.
    """
    b, g, s, n, d = sk.shape
    dv = v.shape[-1]
    if memory is None:
        memory = empty_memory(b, g, d, dv, device=sk.device, dtype=state_dtype)
    M0, z0 = memory
    z_updates = sk.sum(dim=3, dtype=state_dtype)  # [b, g, s, d]

    if update == "linear":
        M_updates = (sk.transpose(-1, -2) @ v).to(state_dtype)  # [b, g, s, d, dv]
        if spans_ranks(context_group):
            return _memories_before_segments_of_rank(M_updates, z_updates, (M0, z0), reset, context_group)
        M_before = exclusive_cumsum_with_resets(M_updates, M0, reset, extra_dims=2)
        z_before = exclusive_cumsum_with_resets(z_updates, z0, reset, extra_dims=1)
        final = InfiniMemory(M_before[:, :, -1] + M_updates[:, :, -1], z_before[:, :, -1] + z_updates[:, :, -1])
        return M_before, z_before, final

    M, z = M0, z0
    M_list, z_list = [], []
    for i in range(s):
        if reset is not None:
            keep = (~reset[:, i]).to(sk.dtype).view(b, 1, 1)
            M, z = M * keep.unsqueeze(-1), z * keep
        M_list.append(M)
        z_list.append(z)
        sk_i = sk[:, :, i]
        M = M + (sk_i.transpose(-1, -2) @ (v[:, :, i] - retrieve(sk_i, M, z)).to(sk.dtype)).to(state_dtype)
        z = z + z_updates[:, :, i]
    return torch.stack(M_list, dim=2), torch.stack(z_list, dim=2), InfiniMemory(M, z)


def _memories_before_segments_of_rank(M_updates, z_updates, memory, reset, context_group):
    """The linear update's memories before this rank's segments: its own writes summed from an empty
    memory, plus the memory before its first segment (from the exchange) where no reset came between."""
    M_own = exclusive_cumsum_with_resets(M_updates, torch.zeros_like(memory[0]), reset, extra_dims=2)
    z_own = exclusive_cumsum_with_resets(z_updates, torch.zeros_like(memory[1]), reset, extra_dims=1)
    writes = (M_own[:, :, -1] + M_updates[:, :, -1], z_own[:, :, -1] + z_updates[:, :, -1])
    b, s = M_updates.shape[0], M_updates.shape[2]
    has_reset = reset.any(dim=1) if reset is not None else torch.zeros(b, dtype=torch.bool, device=M_updates.device)
    (M_in, z_in), final = exchange_memory(memory, writes, has_reset, context_group)
    no_reset_yet = (
        torch.ones(b, s, dtype=torch.bool, device=M_updates.device) if reset is None else reset.cumsum(dim=1) == 0
    ).to(M_updates.dtype)
    M_before = M_own + M_in.unsqueeze(2) * no_reset_yet.view(b, 1, s, 1, 1)
    z_before = z_own + z_in.unsqueeze(2) * no_reset_yet.view(b, 1, s, 1)
    return M_before, z_before, InfiniMemory(*final)


def read_and_mix(q, local, M_before, z_before, gate, query_scale=1.0, *, half_products=False):
    """sigmoid(gate) * (the read of M_before, z_before with sigma(query_scale * q)) + (1 - sigmoid(gate)) * local.

    q [b, h, t, d], local [b, h, t, dv] (local attention's output), M_before [b, g, s, d, dv] and z_before
    [b, g, s, d]: the memory before each of the s segments; query head i reads KV group i // (h / g).
    The mix in the memory dtype; returns [b, h, t, dv] in q's dtype. modeling.memory_kernels.memory_read
    computes the same in fused kernels.
    """
    b, h, t, d = q.shape
    g, s, dv = M_before.shape[1], M_before.shape[2], M_before.shape[4]
    state_dtype = memory_dtype(q.dtype)
    operand_dtype = q.dtype if half_products else state_dtype
    sq = scaled_sigma(q, query_scale, operand_dtype).reshape(b, g, h // g, s, t // s, d)
    from_memory = retrieve(sq, M_before.unsqueeze(2), z_before.unsqueeze(2)).reshape(b, h, t, dv)
    weight = torch.sigmoid(gate.to(state_dtype)).view(1, h, 1, 1)
    out = weight * from_memory + (1.0 - weight) * local.to(state_dtype)
    return out.to(q.dtype)


def infini_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    memory: Optional[tuple] = None,
    *,
    segment_length: int,
    update: str = "linear",
    reset: Optional[torch.Tensor] = None,
    rotary_pos_emb: Optional[torch.Tensor] = None,
    half_memory_products: bool = False,
    memory_key_scale: Union[float, torch.Tensor] = 1.0,
    memory_query_scale: Union[float, torch.Tensor] = 1.0,
    context_group=None,
    fused_memory_read: bool = False,
    fused_memory_write: bool = False,
):
    """Infini-attention over ``tokens = n_segments * segment_length`` tokens.

    q: [b, h, t, d]; k: [b, g, t, d]; v: [b, g, t, dv] with g dividing h (g < h is GQA: one memory
    per KV group). gate: [h] raw beta. memory: None (empty) or (M [b, g, d, dv], z [b, g, d]) in
    float32 (float64 for float64 inputs). reset: bool [b, n_segments], True empties that row's memory
    before that segment.
    rotary_pos_emb: RoPE angles for positions 0..segment_length-1, applied to local attention only.
    half_memory_products: for half-precision inputs, the memory's matmuls take sigma(q), sigma(k), v
    and the memory rounded to the input dtype (float32 accumulation); the memory is still summed
    and kept in float32. Otherwise every operand is float32.
    memory_key_scale: the memory writes sigma(memory_key_scale * k): a number > 0, or a tensor [g] of
    one positive scale per KV head. Above 1 it sharpens what a read weighs (sigma is exp below 0).
    memory_query_scale: the memory is read with sigma(memory_query_scale * q): a number > 0 or a
    tensor [h], one per query head. Gradients flow into scale tensors.
    context_group: a process group of several ranks for context parallelism (linear update only): q, k,
    v and reset are this rank's contiguous share of a window's segments, in rank order; memory is the
    memory at the window's start (the same on every rank). The returned memory is the one after the
    window's last segment, on every rank of the group.
    fused_memory_read: the memory read and the gate mix in one Triton kernel per direction
    (modeling/memory_kernels.py), with no float32 [b, h, t, dv] intermediates; CUDA inputs only (CPU
    ones under Triton's interpreter); float32 memory and sums as here, half operands only with
    half_memory_products.
    fused_memory_write: the memory write in one Triton kernel per direction (modeling/memory_kernels.py),
    with no float32 copies of sigma(k) [b, g, t, d]; CUDA inputs only (CPU ones under Triton's
    interpreter); float32 memory and sums as here; not with a context_group of several ranks.

    Returns (out [b, h, t, dv] in q's dtype, InfiniMemory after the last segment). Gradients flow
    through the memory across all segments (and into the given memory).
    """
    _check_inputs(
        q,
        k,
        v,
        gate,
        memory,
        segment_length,
        update,
        reset,
        dict(memory_key_scale=memory_key_scale, memory_query_scale=memory_query_scale),
        context_group,
        fused_memory_write,
    )
    b, h, t, d = q.shape
    g, dv = k.shape[1], v.shape[3]
    s, n = t // segment_length, segment_length

    local = local_attention(q, k, v, segment_length, rotary_pos_emb)

    if fused_memory_write:
        # Imported here: Triton is needed only with the fused kernels.
        from modeling.memory_kernels import memory_write

        M_before, z_before, final = memory_write(
            k,
            v,
            memory,
            reset,
            segment_length=segment_length,
            update=update,
            key_scale=memory_key_scale,
            half_products=half_memory_products,
        )
    else:
        state_dtype = memory_dtype(q.dtype)
        operand_dtype = q.dtype if half_memory_products else state_dtype
        sk = scaled_sigma(k, memory_key_scale, operand_dtype).reshape(b, g, s, n, d)
        M_before, z_before, final = _memories_before_segments(
            sk, v.to(operand_dtype).reshape(b, g, s, n, dv), memory, reset, update, state_dtype, context_group
        )
    if fused_memory_read:
        # Imported here: Triton is needed only with the fused read.
        from modeling.memory_kernels import memory_read
    else:
        memory_read = read_and_mix
    out = memory_read(q, local, M_before, z_before, gate, memory_query_scale, half_products=half_memory_products)
    return out, final
