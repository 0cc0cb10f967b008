"""Independent float64 references: Infini-attention, and attention without the memory, as plain loops
over segments and tokens."""

import math

import torch


def _rope(x, rotary_pos_emb):
    """Non-interleaved RoPE, element by element, at the angles [positions, (1, 1,) rot_dim] given (None: x)."""
    if rotary_pos_emb is None:
        return x
    angles = rotary_pos_emb.reshape(rotary_pos_emb.shape[0], -1).double()
    half = angles.shape[-1] // 2
    out = x.clone()
    for pos in range(x.shape[-2]):
        for i in range(half):
            a = angles[pos, i]
            x1, x2 = x[..., pos, i], x[..., pos, i + half]
            out[..., pos, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., pos, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def reference_segment_attention(q, k, v, *, segment_length, rotary_pos_emb=None):
    """Attention without the memory, in float64: per segment and query head, each token's softmax over
    the segment's tokens up to itself (RoPE restarted at every segment), one token at a time."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, t, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, t, v.shape[3], dtype=torch.float64)
    for start in range(0, t, segment_length):
        sl = slice(start, start + segment_length)
        qr, kr, vs = _rope(q[:, :, sl], rotary_pos_emb), _rope(k[:, :, sl], rotary_pos_emb), v[:, :, sl]
        for head in range(h):
            for i in range(segment_length):
                scores = (kr[:, head // group, : i + 1] @ qr[:, head, i].unsqueeze(-1)).squeeze(-1) / math.sqrt(d)
                weights = torch.softmax(scores, dim=-1)  # [b, i + 1]
                out[:, head, start + i] = (weights.unsqueeze(-1) * vs[:, head // group, : i + 1]).sum(dim=1)
    return out


def reference_infini_attention(
    q,
    k,
    v,
    gate,
    memory=None,
    *,
    segment_length,
    update="linear",
    reset=None,
    rotary_pos_emb=None,
    memory_key_scale=1.0,
    memory_query_scale=1.0,
):
    """Straight from the paper's equations; every tensor in float64, one segment at a time. The memory
    is written with sigma(memory_key_scale * k) and read with sigma(memory_query_scale * q); each scale
    a number or a tensor of one per head (KV heads for keys, query heads for queries)."""
    q, k, v, gate = q.double(), k.double(), v.double(), gate.double()
    b, h, t, d = q.shape
    g, dv = k.shape[1], v.shape[3]
    key_scales = torch.as_tensor(memory_key_scale).double().expand(g)
    query_scales = torch.as_tensor(memory_query_scale).double().expand(h)
    group = h // g
    n_segments = t // segment_length
    if memory is None:
        M = torch.zeros(b, g, d, dv, dtype=torch.float64)
        z = torch.zeros(b, g, d, dtype=torch.float64)
    else:
        M, z = memory[0].double(), memory[1].double()

    def sig(x):
        return torch.where(x > 0, x + 1.0, torch.exp(x))

    def rope(x):
        return _rope(x, rotary_pos_emb)

    outputs = []
    for s in range(n_segments):
        sl = slice(s * segment_length, (s + 1) * segment_length)
        if reset is not None:
            keep = (~reset[:, s]).double()
            M = M * keep.view(b, 1, 1, 1)
            z = z * keep.view(b, 1, 1)
        qs, ks, vs = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        seg_out = torch.zeros(b, h, segment_length, dv, dtype=torch.float64)
        qr, kr = rope(qs), rope(ks)
        for head in range(h):
            kv = head // group
            scores = qr[:, head] @ kr[:, kv].transpose(-1, -2) / math.sqrt(d)
            causal = torch.ones(segment_length, segment_length, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            local = torch.softmax(scores, dim=-1) @ vs[:, kv]
            sq = sig(query_scales[head] * qs[:, head])
            num = sq @ M[:, kv]
            den = sq @ z[:, kv].unsqueeze(-1)
            mem = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
            w = torch.sigmoid(gate[head])
            seg_out[:, head] = w * mem + (1 - w) * local
        outputs.append(seg_out)
        sk = sig(key_scales.view(1, g, 1, 1) * ks)
        if update == "linear":
            M = M + sk.transpose(-1, -2) @ vs
        else:
            num = sk @ M
            den = sk @ z.unsqueeze(-1)
            retrieved = torch.where(
                den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num)
            )
            M = M + sk.transpose(-1, -2) @ (vs - retrieved)
        z = z + sk.sum(dim=2)
    return torch.cat(outputs, dim=2), (M, z)
