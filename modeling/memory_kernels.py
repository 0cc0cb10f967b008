"""The memory read of Infini-attention with its gate mix, and the memory write, as Triton kernels, one per direction.

The read, for every query token of every segment:

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

The write gives the memory before every segment and after the last (``_memories_before_segments`` in
modeling/infini_attention.py): M_s = M_{s-1} + sigma(c_k k)^T v (linear) or sigma(c_k k)^T (v - the read of
M_{s-1} with sigma(c_k k)) (delta), z_s = z_{s-1} + sum_t sigma(c_k k_t), without float32 [b, g, s, n, d]
copies of sigma(c_k k). The linear rule's writes read nothing, so one program writes a tile of one segment's
update straight into the output and a second kernel sums them over the segments in place; the delta rule's
read the memory before them, so there one program keeps a tile of one KV group's memory in float32 and runs the
segments in order, storing it before each. The backward runs the segments in reverse for M's gradient, then
every chunk of every segment apart for dk and dv, from the memories the forward stored.

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
        "the fused memory read and write (performance.fused_memory_read, performance.fused_memory_write) need "
        "Triton, which is not installed",
        name="triton",
    ) from error

from modeling.memory import UPDATE_RULES, InfiniMemory, empty_memory, exclusive_cumsum_with_resets

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


@triton.jit
def _key_features(k_base, k_st, k_sd, tokens, row_ok, cols, col_ok, scale, HALF: tl.constexpr):
    """Keys k [T, D] of the given tokens in float32, sigma(scale k) (0 outside the masks; in k's dtype
    with HALF), its derivative, and the mask."""
    mask = row_ok[:, None] & col_ok[None, :]
    k = tl.load(k_base + tokens[:, None] * k_st + cols[None, :] * k_sd, mask=mask, other=0.0).to(tl.float32)
    sk, dsk_dx = _sigma(k * scale)
    sk = tl.where(mask, sk, 0.0)
    if HALF:
        sk = sk.to(k_base.dtype.element_ty)
    return k, sk, dsk_dx, mask


@triton.jit
def _write_read_gradients(dvalues, read, safe, has_memory):
    """The gradients of the delta rule's read numerator [T, DV] and denominator [T], from that of v - read."""
    dnumerator = tl.where(has_memory[:, None], -dvalues / safe[:, None], 0.0)
    ddenominator = tl.where(has_memory, tl.sum(dvalues * read, axis=1) / safe, 0.0)
    return dnumerator, ddenominator


@triton.jit
def _memory_tile(dtile, vtile, d, dv, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One (d, dv) tile of a contiguous [d, dv] memory: its rows and columns with their masks, the tile's mask and
    offsets, and the mask of the z entries it stores (only the first dv tile's programs store z)."""
    cols, vcols = dtile * BLOCK_D + tl.arange(0, BLOCK_D), vtile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok, vcol_ok = cols < d, vcols < dv
    mv_mask = col_ok[:, None] & vcol_ok[None, :]
    z_mask = col_ok & (tl.full((BLOCK_D,), vtile, tl.int32) == 0)
    return cols, vcols, col_ok, vcol_ok, mv_mask, cols[:, None] * dv + vcols[None, :], z_mask


@triton.jit
def _memory_write_updates(
    k_ptr, v_ptr, scale_ptr, mb_ptr, zb_ptr,
    k_sb, k_sg, k_st, k_sd,
    v_sb, v_sg, v_st, v_sd,
    groups, segments, segment_length, d, dv, vtiles,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The linear rule's write of each segment, sigma(k)^T v into mb [b, g, s, d, dv] and sum_t sigma(k_t) into
    zb [b, g, s, d] (contiguous float32; z by the first dv tile's programs), of one (d, dv) tile of one segment of
    one KV group: no write reads the memory, so the segments go apart and _memory_write_scan sums them after."""
    tile, segment, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    vtile, dtile = tile % vtiles, tile // vtiles
    batch, group = batch_group // groups, batch_group % groups
    rows = tl.arange(0, BLOCK_T)
    cols, vcols, col_ok, vcol_ok, mv_mask, mv_offsets, z_mask = _memory_tile(dtile, vtile, d, dv, BLOCK_D, BLOCK_DV)
    scale = tl.load(scale_ptr + group)
    k_base = k_ptr + batch * k_sb + group * k_sg
    v_base = v_ptr + batch * v_sb + group * v_sg
    dm = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, segment_length, BLOCK_T):
        row_ok = t0 + rows < segment_length
        tokens = segment * segment_length + t0 + rows
        _, sk, _, _ = _key_features(k_base, k_st, k_sd, tokens, row_ok, cols, col_ok, scale, HALF)
        v_mask = row_ok[:, None] & vcol_ok[None, :]
        values = tl.load(v_base + tokens[:, None] * v_st + vcols[None, :] * v_sd, mask=v_mask, other=0.0)
        values = values.to(tl.float32)
        if HALF:
            values = values.to(k_ptr.dtype.element_ty)
        dm += tl.dot(tl.trans(sk), values, input_precision=PRECISION)
        dz += tl.sum(sk.to(tl.float32), axis=0)
    before = batch_group * segments + segment
    tl.store(mb_ptr + before * d * dv + mv_offsets, dm, mask=mv_mask)
    tl.store(zb_ptr + before * d + cols, dz, mask=z_mask)


@triton.jit
def _memory_write_scan(
    m0_ptr, z0_ptr, reset_ptr, mb_ptr, zb_ptr, m_ptr, z_ptr,
    r_sb, r_ss,
    groups, segments, d, dv,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_RESET: tl.constexpr,
):  # fmt: skip
    """In place, the memories before each segment (mb, zb) from the writes of the segments they hold and the
    initial memory (m0, z0): a sum over the segments before, emptied where reset; and the memory after the last one
    (m, z). One (d, dv) tile of one KV group, z by the first dv tile's programs; all contiguous float32."""
    vtile, dtile, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch = batch_group // groups
    cols, vcols, col_ok, vcol_ok, mv_mask, mv_offsets, z_mask = _memory_tile(dtile, vtile, d, dv, BLOCK_D, BLOCK_DV)
    m = tl.load(m0_ptr + batch_group * d * dv + mv_offsets, mask=mv_mask, other=0.0)
    z = tl.load(z0_ptr + batch_group * d + cols, mask=z_mask, other=0.0)
    for segment in range(segments):
        if HAS_RESET:
            keep = tl.load(reset_ptr + batch * r_sb + segment * r_ss) == 0
            m, z = tl.where(keep, m, 0.0), tl.where(keep, z, 0.0)
        before = batch_group * segments + segment
        dm = tl.load(mb_ptr + before * d * dv + mv_offsets, mask=mv_mask, other=0.0)
        dz = tl.load(zb_ptr + before * d + cols, mask=z_mask, other=0.0)
        tl.store(mb_ptr + before * d * dv + mv_offsets, m, mask=mv_mask)
        tl.store(zb_ptr + before * d + cols, z, mask=z_mask)
        m += dm
        z += dz
    tl.store(m_ptr + batch_group * d * dv + mv_offsets, m, mask=mv_mask)
    tl.store(z_ptr + batch_group * d + cols, z, mask=z_mask)


@triton.jit
def _memory_write_forward(
    k_ptr, v_ptr, scale_ptr, m0_ptr, z0_ptr, reset_ptr, mb_ptr, zb_ptr, m_ptr, z_ptr,
    k_sb, k_sg, k_st, k_sd,
    v_sb, v_sg, v_st, v_sd,
    r_sb, r_ss,
    groups, segments, segment_length, d, dv,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_RESET: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The delta rule's memory before each segment (mb [b, g, s, d, dv], zb [b, g, s, d]) and after the last one
    (m, z), all contiguous float32, of one (d, dv) tile of one KV group, segments in order (each write reads the
    memory before it); z by the first dv tile's programs."""
    vtile, dtile, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, group = batch_group // groups, batch_group % groups
    rows = tl.arange(0, BLOCK_T)
    cols, vcols, col_ok, vcol_ok, mv_mask, mv_offsets, z_mask = _memory_tile(dtile, vtile, d, dv, BLOCK_D, BLOCK_DV)
    m = tl.load(m0_ptr + batch_group * d * dv + mv_offsets, mask=mv_mask, other=0.0)
    z = tl.load(z0_ptr + batch_group * d + cols, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr + group)
    k_base = k_ptr + batch * k_sb + group * k_sg
    v_base = v_ptr + batch * v_sb + group * v_sg
    for segment in range(segments):
        if HAS_RESET:
            keep = tl.load(reset_ptr + batch * r_sb + segment * r_ss) == 0
            m, z = tl.where(keep, m, 0.0), tl.where(keep, z, 0.0)
        before = batch_group * segments + segment
        tl.store(mb_ptr + before * d * dv + mv_offsets, m, mask=mv_mask)
        tl.store(zb_ptr + before * d + cols, z, mask=z_mask)
        m_read, z_read = m, z
        if HALF:
            m_read, z_read = m.to(k_ptr.dtype.element_ty), z.to(k_ptr.dtype.element_ty)
        # The segment's tokens all read the memory before it: the writes go apart.
        dm = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
        dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t0 in range(0, segment_length, BLOCK_T):
            row_ok = t0 + rows < segment_length
            tokens = segment * segment_length + t0 + rows
            _, sk, _, _ = _key_features(k_base, k_st, k_sd, tokens, row_ok, cols, col_ok, scale, HALF)
            v_mask = row_ok[:, None] & vcol_ok[None, :]
            values = tl.load(v_base + tokens[:, None] * v_st + vcols[None, :] * v_sd, mask=v_mask, other=0.0)
            read, _, _ = _read(sk, m_read, z_read, PRECISION)
            values = values.to(tl.float32) - read
            if HALF:
                values = values.to(k_ptr.dtype.element_ty)
            dm += tl.dot(tl.trans(sk), values, input_precision=PRECISION)
            dz += tl.sum(sk.to(tl.float32), axis=0)
        m += dm
        z += dz
    tl.store(m_ptr + batch_group * d * dv + mv_offsets, m, mask=mv_mask)
    tl.store(z_ptr + batch_group * d + cols, z, mask=z_mask)


@triton.jit
def _memory_write_backward_memory(
    k_ptr, scale_ptr, mb_ptr, zb_ptr, reset_ptr, gmb_ptr, gm_ptr, dma_ptr, dzr_ptr, dm0_ptr,
    k_sb, k_sg, k_st, k_sd,
    r_sb, r_ss,
    groups, segments, segment_length, d, dv, vtiles,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DELTA: tl.constexpr, HAS_RESET: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward through the memory M of one (d, dv) tile of one KV group, segments in reverse, from the gradients
    of the memories before each segment (gmb) and of the final one (gm): the gradient of the memory after each
    segment (dma [b, g, s, d, dv]) and of the initial one (dm0); with DELTA also this tile's share of the
    gradient of z before each segment through the writes' reads (dzr [b, g, s, vtiles, d]). All contiguous
    float32."""
    vtile, dtile, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, group = batch_group // groups, batch_group % groups
    rows = tl.arange(0, BLOCK_T)
    cols, vcols, col_ok, vcol_ok, mv_mask, mv_offsets, z_mask = _memory_tile(dtile, vtile, d, dv, BLOCK_D, BLOCK_DV)
    scale = tl.load(scale_ptr + group)
    k_base = k_ptr + batch * k_sb + group * k_sg
    da = tl.load(gm_ptr + batch_group * d * dv + mv_offsets, mask=mv_mask, other=0.0)
    for i in range(segments):
        segment = segments - 1 - i
        before = batch_group * segments + segment
        tl.store(dma_ptr + before * d * dv + mv_offsets, da, mask=mv_mask)
        if DELTA:
            # M_s = P + sigma(k)^T (v - read(P, z)), P the memory before the segment: P's gradient through the read.
            p, z = _load_memory(
                mb_ptr + before * d * dv, zb_ptr + before * d, dv, 1, 1, cols, vcols, col_ok, mv_mask, k_ptr, HALF
            )
            da_operand = da
            if HALF:
                da_operand = da_operand.to(k_ptr.dtype.element_ty)
            dp = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
            dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for t0 in range(0, segment_length, BLOCK_T):
                row_ok = t0 + rows < segment_length
                tokens = segment * segment_length + t0 + rows
                _, sk, _, _ = _key_features(k_base, k_st, k_sd, tokens, row_ok, cols, col_ok, scale, HALF)
                read, safe, has_memory = _read(sk, p, z, PRECISION)
                dvalues = tl.dot(sk, da_operand, input_precision=PRECISION)
                dnumerator, ddenominator = _write_read_gradients(dvalues, read, safe, has_memory)
                if HALF:
                    dnumerator = dnumerator.to(k_ptr.dtype.element_ty)
                dp += tl.dot(tl.trans(sk), dnumerator, input_precision=PRECISION)
                dz += tl.sum(sk.to(tl.float32) * ddenominator[:, None], axis=0)
            tl.store(dzr_ptr + (before * vtiles + vtile) * d + cols, dz, mask=col_ok)
            da += dp
        da += tl.load(gmb_ptr + before * d * dv + mv_offsets, mask=mv_mask, other=0.0)
        if HAS_RESET:
            keep = tl.load(reset_ptr + batch * r_sb + segment * r_ss) == 0
            da = tl.where(keep, da, 0.0)
    tl.store(dm0_ptr + batch_group * d * dv + mv_offsets, da, mask=mv_mask)


@triton.jit
def _memory_write_backward(
    k_ptr, v_ptr, scale_ptr, mb_ptr, zb_ptr, dma_ptr, dza_ptr, dk_ptr, dv_ptr, dscale_ptr,
    k_sb, k_sg, k_st, k_sd,
    v_sb, v_sg, v_st, v_sd,
    dk_sb, dk_sg, dk_st, dk_sd,
    dv_sb, dv_sg, dv_st, dv_sd,
    groups, segments, chunks, segment_length, chunk_tokens, d, dv,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DELTA: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk and dv of a chunk of one segment's tokens, in the dtypes of k and v, from the gradients of the memory
    after the segment (dma [b, g, s, d, dv], dza [b, g, s, d]); the chunk's share of the key scale's gradient
    (dscale [b, g, s, chunks]), in float32."""
    chunk, segment, batch_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, group = batch_group // groups, batch_group % groups
    rows, cols, vcols = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    col_ok, vcol_ok = cols < d, vcols < dv
    mv_mask = col_ok[:, None] & vcol_ok[None, :]
    before = batch_group * segments + segment
    da = tl.load(dma_ptr + before * d * dv + cols[:, None] * dv + vcols[None, :], mask=mv_mask, other=0.0)
    dza = tl.load(dza_ptr + before * d + cols, mask=col_ok, other=0.0)
    if HALF:
        da = da.to(k_ptr.dtype.element_ty)
    if DELTA:
        p, z = _load_memory(
            mb_ptr + before * d * dv, zb_ptr + before * d, dv, 1, 1, cols, vcols, col_ok, mv_mask, k_ptr, HALF
        )
        z32 = z.to(tl.float32)
    scale = tl.load(scale_ptr + group)
    offset = segment * segment_length
    k_base = k_ptr + batch * k_sb + group * k_sg + offset * k_st
    v_base = v_ptr + batch * v_sb + group * v_sg + offset * v_st
    dk_base = dk_ptr + batch * dk_sb + group * dk_sg + offset * dk_st
    dv_base = dv_ptr + batch * dv_sb + group * dv_sg + offset * dv_st
    dscale = tl.zeros((BLOCK_T,), dtype=tl.float32)

    start = chunk * chunk_tokens
    end = tl.minimum(start + chunk_tokens, segment_length)
    for t0 in range(start, end, BLOCK_T):
        tokens = t0 + rows
        row_ok = tokens < end
        k, sk, dsk_dx, k_mask = _key_features(k_base, k_st, k_sd, tokens, row_ok, cols, col_ok, scale, HALF)
        v_mask = row_ok[:, None] & vcol_ok[None, :]
        values = tl.load(v_base + tokens[:, None] * v_st + vcols[None, :] * v_sd, mask=v_mask, other=0.0)
        values = values.to(tl.float32)
        # The segment writes sigma(k)^T values (values = v, or v - read with the delta rule).
        dvalues = tl.dot(sk, da, input_precision=PRECISION)
        dv_out = dvalues.to(dv_ptr.dtype.element_ty)
        tl.store(dv_base + tokens[:, None] * dv_st + vcols[None, :] * dv_sd, dv_out, mask=v_mask)
        if DELTA:
            read, safe, has_memory = _read(sk, p, z, PRECISION)
            values -= read
            dnumerator, ddenominator = _write_read_gradients(dvalues, read, safe, has_memory)
            if HALF:
                dnumerator = dnumerator.to(k_ptr.dtype.element_ty)
            dsk = tl.dot(dnumerator, tl.trans(p), input_precision=PRECISION) + ddenominator[:, None] * z32[None, :]
        else:
            dsk = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if HALF:
            values = values.to(k_ptr.dtype.element_ty)
        dsk += tl.dot(values, tl.trans(da), input_precision=PRECISION) + dza[None, :]
        dx = tl.where(k_mask, dsk * dsk_dx, 0.0)
        dk = (dx * scale).to(dk_ptr.dtype.element_ty)
        tl.store(dk_base + tokens[:, None] * dk_st + cols[None, :] * dk_sd, dk, mask=k_mask)
        dscale += tl.sum(dx * k, axis=1)
    tl.store(dscale_ptr + before * chunks + chunk, tl.sum(dscale, axis=0))


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


def check_inputs(q: torch.Tensor, what: str = "the fused memory read") -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what} takes {SUPPORTED_DTYPES} inputs, got {q.dtype}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRETED):
        raise ValueError(
            f"{what} runs on CUDA tensors (got {q.device.type}); CPU tensors only under Triton's "
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


def _write_launch(k: torch.Tensor, v: torch.Tensor, delta: bool, half_products: bool, block: int):
    """The grid (dv tiles, d tiles, b * g) of the kernels that carry a tile of the memory over the segments, the
    tile settings (also of the linear rule's writes, a program per tile and segment) and the products' settings:
    tiles of block x block (64 with 0; whole rows of d with the delta rule, whose read sums over d)."""
    b, g, _, d = k.shape
    dv = v.shape[3]
    tile = _block(block or 64)
    block_d = _block(d) if delta else min(tile, _block(d))
    block_dv = min(tile, _block(dv))
    tiles = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=8 if block_d * block_dv >= 128 * 64 else 4)
    products = dict(HALF=half_products and k.dtype != torch.float32, PRECISION=_precision())
    return (triton.cdiv(dv, block_dv), triton.cdiv(d, block_d), b * g), tiles, products


def _reset_arguments(reset: Optional[torch.Tensor], other: torch.Tensor):
    """The reset flags as bytes and their strides; without resets any pointer (not read) and zeros."""
    if reset is None:
        return other, (0, 0)
    return reset.view(torch.uint8), reset.stride()


# Registered as operators, as the read: a compiled layer keeps the fused write as one node.
@torch.library.custom_op("infinitron::memory_write", mutates_args=())
def _memory_write(
    k: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    M0: torch.Tensor,
    z0: torch.Tensor,
    reset: Optional[torch.Tensor],
    segment_length: int,
    delta: bool,
    half_products: bool,
    block: int,
    chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, g, t, d = k.shape
    dv, s = v.shape[3], t // segment_length
    grid, tiles, products = _write_launch(k, v, delta, half_products, block)
    M_before = torch.empty(b, g, s, d, dv, dtype=torch.float32, device=k.device)
    z_before = torch.empty(b, g, s, d, dtype=torch.float32, device=k.device)
    M = torch.empty_like(M0, memory_format=torch.contiguous_format)
    z = torch.empty_like(z0, memory_format=torch.contiguous_format)
    flags, flag_strides = _reset_arguments(reset, scale)
    block_t = min(64, _block(segment_length))
    if delta:
        _memory_write_forward[grid](
            k, v, scale, M0.contiguous(), z0.contiguous(), flags, M_before, z_before, M, z,
            *k.stride(), *v.stride(), *flag_strides,
            g, s, segment_length, d, dv,
            BLOCK_T=block_t, HAS_RESET=reset is not None, **tiles, **products,
        )  # fmt: skip
        return M_before, z_before, M, z
    vtiles, dtiles, batch_groups = grid
    # The segments' writes go into M_before and z_before, then the scan turns them into the memories in place.
    _memory_write_updates[(vtiles * dtiles, s, batch_groups)](
        k, v, scale, M_before, z_before,
        *k.stride(), *v.stride(),
        g, s, segment_length, d, dv, vtiles,
        BLOCK_T=block_t, **tiles, **products,
    )  # fmt: skip
    _memory_write_scan[grid](
        M0.contiguous(), z0.contiguous(), flags, M_before, z_before, M, z,
        *flag_strides, g, s, d, dv,
        HAS_RESET=reset is not None, **tiles,
    )  # fmt: skip
    return M_before, z_before, M, z


@_memory_write.register_fake
def _(k, v, scale, M0, z0, reset, segment_length, delta, half_products, block, chunks):
    b, g, t, d = k.shape
    s = t // segment_length
    return M0.new_empty(b, g, s, d, v.shape[3]), z0.new_empty(b, g, s, d), torch.empty_like(M0), torch.empty_like(z0)


def _gradients_after_segments(before, final, reset, extra_dims):
    """The gradients of the memory after each segment and of the initial memory, from those of the memories
    before each segment (before [b, g, s, ...]) and after the last one (final [b, g, ...]): the memory before
    segment s is the one after s - 1, emptied where reset, so after_{s-1} = keep_s (after_s + before_s) and
    initial = keep_0 (after_0 + before_0)."""
    backwards = None
    if reset is not None:
        # Read backwards, the reset before segment s + 1 empties what flows on to segment s.
        backwards = torch.cat([torch.zeros_like(reset[:, :1]), reset.flip(1)[:, :-1]], dim=1)
    after = exclusive_cumsum_with_resets(before.flip(2), final, backwards, extra_dims).flip(2)
    initial = after[:, :, 0] + before[:, :, 0]
    if reset is not None:
        initial = initial * (~reset[:, 0]).to(initial.dtype).view(-1, *([1] * (initial.dim() - 1)))
    return after, initial


@torch.library.custom_op("infinitron::memory_write_backward", mutates_args=())
def _memory_write_grads(
    k: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    M_before: torch.Tensor,
    z_before: torch.Tensor,
    reset: Optional[torch.Tensor],
    dM_before: torch.Tensor,
    dz_before: torch.Tensor,
    dM: torch.Tensor,
    dz: torch.Tensor,
    segment_length: int,
    delta: bool,
    half_products: bool,
    block: int,
    chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dk, dv, dscale, dM0, dz0 of the forward with the same arguments, given the memories it returned.

    A reverse pass over the segments carries M's gradient (with the delta rule through each write's read,
    whose z gradient it leaves per dv tile); z's gradient is a reverse sum with resets over [b, g, s, d];
    then every chunk of every segment runs apart for dk and dv."""
    b, g, t, d = k.shape
    dv, s = v.shape[3], t // segment_length
    grid, tiles, products = _write_launch(k, v, delta, half_products, block)
    flags, flag_strides = _reset_arguments(reset, scale)
    dM_after = torch.empty_like(M_before)
    dM0 = torch.empty(b, g, d, dv, dtype=torch.float32, device=k.device)
    # Only the delta rule reads while writing; linear passes any pointer there, not written.
    dz_reads = torch.empty(b, g, s, grid[0], d, dtype=torch.float32, device=k.device) if delta else dM0
    _memory_write_backward_memory[grid](
        k, scale, M_before, z_before, flags, dM_before.contiguous(), dM.contiguous(), dM_after, dz_reads, dM0,
        *k.stride(), *flag_strides,
        g, s, segment_length, d, dv, grid[0],
        BLOCK_T=min(32, _block(segment_length)), DELTA=delta, HAS_RESET=reset is not None, **tiles, **products,
    )  # fmt: skip
    if delta:
        dz_before = dz_before + dz_reads.sum(3)
    dz_after, dz0 = _gradients_after_segments(dz_before, dz, reset, extra_dims=1)

    block_t = min(32, _block(segment_length))
    token_blocks = -(-segment_length // block_t)
    chunks = chunks or _chunks(b * g * s, token_blocks, k.device)
    dk, dvalues = torch.empty_like(k), torch.empty_like(v)
    dscale = torch.empty(b, g, s, chunks, dtype=torch.float32, device=k.device)
    _memory_write_backward[(chunks, s, b * g)](
        k, v, scale, M_before, z_before, dM_after, dz_after.contiguous(), dk, dvalues, dscale,
        *k.stride(), *v.stride(), *dk.stride(), *dvalues.stride(),
        g, s, chunks, segment_length, -(-token_blocks // chunks) * block_t, d, dv,
        BLOCK_T=block_t, BLOCK_D=_block(d), BLOCK_DV=_block(dv), DELTA=delta, **products,
        num_warps=8 if d * dv >= 128 * 128 else 4,
    )  # fmt: skip
    return dk, dvalues, dscale.sum((0, 2, 3)), dM0, dz0


@_memory_write_grads.register_fake
def _(k, v, scale, M_before, z_before, reset, dM_before, dz_before, dM, dz, segment_length, delta, half, block, chunks):
    return torch.empty_like(k), torch.empty_like(v), torch.empty_like(scale), torch.empty_like(dM), torch.empty_like(dz)


def _save_for_write_backward(ctx, inputs, output):
    k, v, scale, M0, z0, reset, *settings = inputs
    ctx.save_for_backward(k, v, scale, output[0], output[1], reset)
    ctx.settings = settings


def _write_backward(ctx, dM_before, dz_before, dM, dz):
    k, v, scale, M_before, z_before, reset = ctx.saved_tensors
    grads = _memory_write_grads(k, v, scale, M_before, z_before, reset, dM_before, dz_before, dM, dz, *ctx.settings)
    return (*grads, None, None, None, None, None, None)


_memory_write.register_autograd(_write_backward, setup_context=_save_for_write_backward)


def memory_write(
    k: torch.Tensor,
    v: torch.Tensor,
    memory: Optional[tuple] = None,
    reset: Optional[torch.Tensor] = None,
    *,
    segment_length: int,
    update: str = "linear",
    key_scale: Union[float, torch.Tensor] = 1.0,
    half_products: bool = False,
    block: Optional[int] = None,
    chunks: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, InfiniMemory]:
    """The memory before each segment and after the last, written segment by segment with sigma(key_scale * k)
    and v by the linear or the delta rule, as infini_attention writes it (there without context parallelism).

    k [b, g, t, d], v [b, g, t, dv] (bf16, fp16 or fp32; any strides), t a whole number of segments of
    segment_length tokens; memory None (empty) or (M [b, g, d, dv], z [b, g, d]) in float32; reset bool [b, s]
    or None, True empties that row's memory before that segment; key_scale a number or a tensor [g].
    half_products: for half inputs, the products take sigma(k) and v (with the delta rule the memory, z and
    v - read, and in backward M's gradient) rounded to k's dtype. block: the side of the memory's tiles a
    program keeps (None: 64; the delta rule keeps whole rows of d). chunks: backward programs per segment
    (None: enough to fill the device).
    Returns M_before [b, g, s, d, dv], z_before [b, g, s, d] and the memory after the last segment, all
    float32; differentiable in k, v, key_scale and memory.
    """
    check_inputs(k, "the fused memory write")
    if update not in UPDATE_RULES:
        raise ValueError(f"update rule must be one of {UPDATE_RULES}, got {update!r}")
    b, g, _, d = k.shape
    if not isinstance(key_scale, torch.Tensor):
        key_scale = torch.full((g,), float(key_scale), device=k.device)
    if memory is None:
        memory = empty_memory(b, g, d, v.shape[3], device=k.device)
    M_before, z_before, M, z = _memory_write(
        k,
        v,
        key_scale.float().contiguous(),
        *memory,
        reset,
        segment_length,
        update == "delta",
        half_products,
        block or 0,
        chunks or 0,
    )
    return M_before, z_before, InfiniMemory(M, z)
