"""The memory read of Infini-attention and its gate mix as Triton kernels, one per direction.

For every query token of every segment:

    out = g * sigma(c_q q) M_{s-1} / (sigma(c_q q) z_{s-1}) + (1 - g) * local,   g = sigmoid(beta)

with an empty memory (denominator 0) read as zeros, as ``infini_attention``'s eager path computes it
(``read_and_mix`` in modeling/infini_attention.py), but with no float32 [b, h, t, d_v] tensor in memory: the forward
kernel writes ``out`` in q's dtype, and the backward kernel recomputes sigma(c_q q) and the read from
q, the memories and ``local`` (which local attention keeps anyway) instead of saving them.

One program runs one KV group's query heads over a chunk of one segment's tokens, so the group's
memory is loaded once per program. Products take float32 operands, or operands rounded to the input
dtype with ``half_products``; they accumulate in float32, as everything else does. The memory's
gradients are summed over a segment's chunks in float32 outside the kernel, so results do not depend
on scheduling.

CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before Triton is first
imported: its own library functions are interpreted only then).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "the fused memory read (performance.fused_memory_read) needs Triton, which is not installed", name="triton"
    ) from error

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _sigma(x):
    """ELU + 1 and its derivative, in float32."""
    positive = x > 0
    e = tl.exp(tl.minimum(x, 0.0))
    return tl.where(positive, x + 1.0, e), tl.where(positive, 1.0, e)


@triton.jit
def _read(sq, m, z, PRECISION: tl.constexpr):
    """The read [T, DV] of sigma(q) rows sq [T, D] (in the products' operand dtype) from m [D, DV], z [D],
    0 where the denominator is; the denominator made safe (1 there) [T]; whether it is > 0 [T]."""
    numerator = tl.dot(sq, m, input_precision=PRECISION)
    denominator = tl.sum(sq.to(tl.float32) * z.to(tl.float32)[None, :], axis=1)
    has_memory = denominator > 0
    safe = tl.where(has_memory, denominator, 1.0)
    read = tl.where(has_memory[:, None], numerator / safe[:, None], 0.0)
    return read, safe, has_memory


@triton.jit
def _load_memory(m_base, z_base, m_sd, m_sv, z_sd, cols, vcols, col_ok, mv_mask, q_ptr, HALF: tl.constexpr):
    """One segment's memory M [D, DV] and z [D] of one KV group, in q's dtype with HALF."""
    m = tl.load(m_base + cols[:, None] * m_sd + vcols[None, :] * m_sv, mask=mv_mask, other=0.0)
    z = tl.load(z_base + cols * z_sd, mask=col_ok, other=0.0)
    if HALF:
        m, z = m.to(q_ptr.dtype.element_ty), z.to(q_ptr.dtype.element_ty)
    return m, z


@triton.jit
def _memory_read_forward(
    q_ptr, local_ptr, m_ptr, z_ptr, gate_ptr, scale_ptr, out_ptr,
    q_sb, q_sh, q_st, q_sd,
    l_sb, l_sh, l_st, l_sd,
    m_sb, m_sg, m_ss, m_sd, m_sv,
    z_sb, z_sg, z_ss, z_sd,
    o_sb, o_sh, o_st, o_sd,
    groups, heads_per_group, segment_length, chunk_tokens, d, dv,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    chunk, segment, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, group = batch_group // groups, batch_group % groups
    rows, cols, vcols = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    col_ok, vcol_ok = cols < d, vcols < dv
    mv_mask = col_ok[:, None] & vcol_ok[None, :]
    m, z = _load_memory(
        m_ptr + batch * m_sb + group * m_sg + segment * m_ss, z_ptr + batch * z_sb + group * z_sg + segment * z_ss,
        m_sd, m_sv, z_sd, cols, vcols, col_ok, mv_mask, q_ptr, HALF,
    )  # fmt: skip

    start = chunk * chunk_tokens
    end = tl.minimum(start + chunk_tokens, segment_length)
    for j in range(heads_per_group):
        head = group * heads_per_group + j
        weight = tl.sigmoid(tl.load(gate_ptr + head))
        scale = tl.load(scale_ptr + head)
        q_base = q_ptr + batch * q_sb + head * q_sh + segment * segment_length * q_st
        l_base = local_ptr + batch * l_sb + head * l_sh + segment * segment_length * l_st
        o_base = out_ptr + batch * o_sb + head * o_sh + segment * segment_length * o_st
        for t0 in range(start, end, BLOCK_T):
            tokens = t0 + rows
            row_ok = tokens < end
            q_mask = row_ok[:, None] & col_ok[None, :]
            v_mask = row_ok[:, None] & vcol_ok[None, :]
            x = tl.load(q_base + tokens[:, None] * q_st + cols[None, :] * q_sd, mask=q_mask, other=0.0)
            sq, _ = _sigma(x.to(tl.float32) * scale)
            sq = tl.where(q_mask, sq, 0.0)
            if HALF:
                sq = sq.to(q_ptr.dtype.element_ty)
            read, _, _ = _read(sq, m, z, PRECISION)
            local = tl.load(l_base + tokens[:, None] * l_st + vcols[None, :] * l_sd, mask=v_mask, other=0.0)
            out = (weight * read + (1.0 - weight) * local.to(tl.float32)).to(out_ptr.dtype.element_ty)
            tl.store(o_base + tokens[:, None] * o_st + vcols[None, :] * o_sd, out, mask=v_mask)


@triton.jit
def _memory_read_backward(
    q_ptr, local_ptr, m_ptr, z_ptr, gate_ptr, scale_ptr, dout_ptr,
    dq_ptr, dlocal_ptr, dm_ptr, dz_ptr, dgate_ptr, dscale_ptr,
    q_sb, q_sh, q_st, q_sd,
    l_sb, l_sh, l_st, l_sd,
    m_sb, m_sg, m_ss, m_sd, m_sv,
    z_sb, z_sg, z_ss, z_sd,
    g_sb, g_sh, g_st, g_sd,
    dq_sb, dq_sh, dq_st, dq_sd,
    dl_sb, dl_sh, dl_st, dl_sd,
    groups, heads_per_group, segments, chunks, segment_length, chunk_tokens, d, dv,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq and dlocal in the dtypes of q and local; this chunk's share of dM, dz [b, g, s, chunks, ...]
    and of the gate's and the query scale's gradients [b, g, s, chunks, heads_per_group], in float32."""
    chunk, segment, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, group = batch_group // groups, batch_group % groups
    rows, cols, vcols = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    col_ok, vcol_ok = cols < d, vcols < dv
    mv_mask = col_ok[:, None] & vcol_ok[None, :]
    m, z = _load_memory(
        m_ptr + batch * m_sb + group * m_sg + segment * m_ss, z_ptr + batch * z_sb + group * z_sg + segment * z_ss,
        m_sd, m_sv, z_sd, cols, vcols, col_ok, mv_mask, q_ptr, HALF,
    )  # fmt: skip
    z32 = z.to(tl.float32)
    dm = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
    part = ((batch * groups + group) * segments + segment) * chunks + chunk

    start = chunk * chunk_tokens
    end = tl.minimum(start + chunk_tokens, segment_length)
    for j in range(heads_per_group):
        head = group * heads_per_group + j
        weight = tl.sigmoid(tl.load(gate_ptr + head))
        scale = tl.load(scale_ptr + head)
        offset = segment * segment_length
        q_base = q_ptr + batch * q_sb + head * q_sh + offset * q_st
        l_base = local_ptr + batch * l_sb + head * l_sh + offset * l_st
        g_base = dout_ptr + batch * g_sb + head * g_sh + offset * g_st
        dq_base = dq_ptr + batch * dq_sb + head * dq_sh + offset * dq_st
        dl_base = dlocal_ptr + batch * dl_sb + head * dl_sh + offset * dl_st
        dgate = tl.zeros((BLOCK_T,), dtype=tl.float32)
        dscale = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            tokens = t0 + rows
            row_ok = tokens < end
            q_mask = row_ok[:, None] & col_ok[None, :]
            v_mask = row_ok[:, None] & vcol_ok[None, :]
            q = tl.load(q_base + tokens[:, None] * q_st + cols[None, :] * q_sd, mask=q_mask, other=0.0)
            q = q.to(tl.float32)
            sq, dsq_dx = _sigma(q * scale)
            sq = tl.where(q_mask, sq, 0.0)
            if HALF:
                sq = sq.to(q_ptr.dtype.element_ty)
            read, safe, has_memory = _read(sq, m, z, PRECISION)
            local = tl.load(l_base + tokens[:, None] * l_st + vcols[None, :] * l_sd, mask=v_mask, other=0.0)
            local = local.to(tl.float32)
            dout = tl.load(g_base + tokens[:, None] * g_st + vcols[None, :] * g_sd, mask=v_mask, other=0.0)
            dout = dout.to(tl.float32)

            dlocal = ((1.0 - weight) * dout).to(dlocal_ptr.dtype.element_ty)
            tl.store(dl_base + tokens[:, None] * dl_st + vcols[None, :] * dl_sd, dlocal, mask=v_mask)
            dgate += tl.sum(dout * (read - local), axis=1)
            # read = numerator / denominator where the denominator is > 0, else a constant 0.
            dread = weight * dout
            dnumerator = tl.where(has_memory[:, None], dread / safe[:, None], 0.0)
            ddenominator = tl.where(has_memory, -tl.sum(dread * read, axis=1) / safe, 0.0)
            if HALF:
                dnumerator = dnumerator.to(q_ptr.dtype.element_ty)
            dsq = tl.dot(dnumerator, tl.trans(m), input_precision=PRECISION) + ddenominator[:, None] * z32[None, :]
            dm += tl.dot(tl.trans(sq), dnumerator, input_precision=PRECISION)
            dz += tl.sum(sq.to(tl.float32) * ddenominator[:, None], axis=0)
            dx = tl.where(q_mask, dsq * dsq_dx, 0.0)
            dq = (dx * scale).to(dq_ptr.dtype.element_ty)
            tl.store(dq_base + tokens[:, None] * dq_st + cols[None, :] * dq_sd, dq, mask=q_mask)
            dscale += tl.sum(dx * q, axis=1)
        tl.store(dgate_ptr + part * heads_per_group + j, tl.sum(dgate, axis=0) * weight * (1.0 - weight))
        tl.store(dscale_ptr + part * heads_per_group + j, tl.sum(dscale, axis=0))
    tl.store(dm_ptr + part * d * dv + cols[:, None] * dv + vcols[None, :], dm, mask=mv_mask)
    tl.store(dz_ptr + part * d + cols, dz, mask=col_ok)


# Whether Triton made the kernels above interpreted ones (TRITON_INTERPRET=1 as it was imported).
INTERPRETED = isinstance(_memory_read_forward, InterpretedFunction)


def _block(size: int) -> int:
    """tl.dot's operands are at least 16 wide."""
    return max(16, triton.next_power_of_2(size))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _chunks(programs: int, token_blocks: int, device: torch.device) -> int:
    """Chunks per segment: enough programs for two per multiprocessor, each at least one block of tokens."""
    return max(1, min(token_blocks, -(-2 * _multiprocessors(device) // programs)))


def _precision() -> str:
    # Float32 operands follow torch's float32 matmul setting (performance.tf32), as the eager path's cuBLAS does.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(q: torch.Tensor, M: torch.Tensor, half_products: bool, chunks: int):
    """(grid, segment length, tokens a chunk, kernel settings) of the forward, the same in backward."""
    b, h, t, d = q.shape
    g, s, dv = M.shape[1], M.shape[2], M.shape[4]
    segment_length = t // s
    block_t = min(64, _block(segment_length))
    token_blocks = -(-segment_length // block_t)
    chunks = chunks or _chunks(b * g * s, token_blocks, q.device)
    config = dict(
        BLOCK_T=block_t,
        BLOCK_D=_block(d),
        BLOCK_DV=_block(dv),
        HALF=half_products and q.dtype != torch.float32,
        PRECISION=_precision(),
        num_warps=8 if d * dv >= 128 * 128 else 4,
    )
    return (chunks, s, b * g), segment_length, -(-token_blocks // chunks) * block_t, config


# Registered as operators, so that a compiled layer keeps the fused read as one opaque node (no graph
# break around raw kernel launches); chunks = 0 picks enough programs to fill the device.
@torch.library.custom_op("infinitron::memory_read", mutates_args=())
def _memory_read(
    q: torch.Tensor,
    local: torch.Tensor,
    M: torch.Tensor,
    z: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    half_products: bool,
    chunks: int,
) -> torch.Tensor:
    b, h, t, d = q.shape
    g, dv = M.shape[1], M.shape[4]
    grid, segment_length, chunk_tokens, config = _launch(q, M, half_products, chunks)
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    _memory_read_forward[grid](
        q, local, M, z, gate, scale, out,
        *q.stride(), *local.stride(), *M.stride(), *z.stride(), *out.stride(),
        g, h // g, segment_length, chunk_tokens, d, dv,
        **config,
    )  # fmt: skip
    return out


@_memory_read.register_fake
def _(q, local, M, z, gate, scale, half_products, chunks):
    return q.new_empty(*q.shape[:3], M.shape[4])


@torch.library.custom_op("infinitron::memory_read_backward", mutates_args=())
def _memory_read_grads(
    q: torch.Tensor,
    local: torch.Tensor,
    M: torch.Tensor,
    z: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    dout: torch.Tensor,
    half_products: bool,
    chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dlocal, dM, dz, dgate, dscale of the forward with the same arguments."""
    grid, segment_length, chunk_tokens, config = _launch(q, M, half_products, chunks)
    chunks, s, _ = grid
    b, h, _, d = q.shape
    g, dv = M.shape[1], M.shape[4]
    dq, dlocal = torch.empty_like(q), torch.empty_like(local)
    dM = torch.empty(b, g, s, chunks, d, dv, dtype=torch.float32, device=q.device)
    dz = torch.empty(b, g, s, chunks, d, dtype=torch.float32, device=q.device)
    dgate = torch.empty(b, g, s, chunks, h // g, dtype=torch.float32, device=q.device)
    dscale = torch.empty_like(dgate)
    _memory_read_backward[grid](
        q, local, M, z, gate, scale, dout,
        dq, dlocal, dM, dz, dgate, dscale,
        *q.stride(), *local.stride(), *M.stride(), *z.stride(), *dout.stride(), *dq.stride(), *dlocal.stride(),
        g, h // g, s, chunks, segment_length, chunk_tokens, d, dv,
        # Backward also holds dM's float32 accumulator: fewer rows a step leave registers for it.
        **(config | dict(BLOCK_T=min(32, config["BLOCK_T"]))),
    )  # fmt: skip
    heads = (0, 2, 3)  # batch, segments and chunks summed: one value per (group, head of the group)
    return (
        dq,
        dlocal,
        dM.sum(3).to(M.dtype),
        dz.sum(3).to(z.dtype),
        dgate.sum(heads).reshape(h),
        dscale.sum(heads).reshape(h),
    )


@_memory_read_grads.register_fake
def _(q, local, M, z, gate, scale, dout, half_products, chunks):
    return (
        torch.empty_like(q),
        torch.empty_like(local),
        torch.empty_like(M),
        torch.empty_like(z),
        torch.empty_like(gate),
        torch.empty_like(scale),
    )


def _save_for_backward(ctx, inputs, output):
    q, local, M, z, gate, scale, half_products, chunks = inputs
    ctx.save_for_backward(q, local, M, z, gate, scale)
    ctx.settings = (half_products, chunks)


def _backward(ctx, dout):
    grads = _memory_read_grads(*ctx.saved_tensors, dout, *ctx.settings)
    return (*grads, None, None)


_memory_read.register_autograd(_backward, setup_context=_save_for_backward)


def check_inputs(q: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the fused memory read takes {SUPPORTED_DTYPES} inputs, got {q.dtype}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRETED):
        raise ValueError(
            f"the fused memory read runs on CUDA tensors (got {q.device.type}); CPU tensors only under Triton's "
            "interpreter, TRITON_INTERPRET=1 set before Triton is first imported"
        )


def memory_read(
    q: torch.Tensor,
    local: torch.Tensor,
    M_before: torch.Tensor,
    z_before: torch.Tensor,
    gate: torch.Tensor,
    query_scale: Union[float, torch.Tensor] = 1.0,
    *,
    half_products: bool = False,
    chunks: Optional[int] = None,
) -> torch.Tensor:
    """sigmoid(gate) * sigma(query_scale * q) M / (sigma(query_scale * q) z) + (1 - sigmoid(gate)) * local.

    q [b, h, t, d] (bf16, fp16 or fp32; any strides), local [b, h, t, dv], M_before [b, g, s, d, dv] and
    z_before [b, g, s, d] in float32 (the memory before each of the s segments of t / s tokens; query
    head i reads its KV group i // (h / g)), gate [h] raw beta, query_scale a number or a tensor [h].
    half_products: for half inputs, the products take sigma(q), M and z (and in backward their
    gradients) rounded to q's dtype. chunks: programs per segment (None: enough to fill the device).
    Returns out [b, h, t, dv] in q's dtype; differentiable in q, local, the memories, gate and query_scale.
    """
    check_inputs(q)
    h = q.shape[1]
    if not isinstance(query_scale, torch.Tensor):
        query_scale = torch.full((h,), float(query_scale), device=q.device)
    return _memory_read(
        q,
        local,
        M_before,
        z_before,
        gate.float().contiguous(),
        query_scale.float().contiguous(),
        half_products,
        chunks or 0,
    )
