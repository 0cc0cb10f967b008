"""An independent float64 reference of the whole model, read from a full (TP=1) state dict.

Plain torch, one segment at a time, straight from the paper and the Llama architecture: RMSNorm,
megatron's fused QKV rows ([per KV group: its query heads, k, v]), RoPE restarted at every segment,
causal softmax inside the segment, compressive memory read before and written after each *whole*
segment, sigmoid gates, SwiGLU (fc1 = [gate; up]). A final partial segment is read-only. Without the
memory (``cfg.memory`` false) each head's output is its causal softmax inside the segment.
"""

import math

import torch
import torch.nn.functional as F


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _sigma(x):
    return F.elu(x) + 1.0


def _rope(x, base):
    """Non-interleaved RoPE over positions 0..n-1 of x [..., n, d]."""
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(state, cfg, tokens, memory_key_scale=1.0, memory_query_scale=1.0):
    """Logits [b, t, padded vocab] in float64 for token ids [b, t] (any t), empty initial memory; the
    memory is written with sigma(memory_key_scale * a * k) and read with sigma(memory_query_scale * b * q),
    a and b the layer's learned per-head scales (exp of the state's log scales) where the state has them."""
    state = {k: v.double() for k, v in state.items()}
    b, t = tokens.shape
    h, g, d = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    per_group = h // g
    eps, L = cfg.norm_epsilon, cfg.segment_length
    embedding = state["embedding.word_embeddings.weight"]
    output = embedding if cfg.tie_embeddings else state["output_layer.weight"]
    x = embedding[tokens]  # [b, t, H]
    memories = [
        (torch.zeros(b, g, d, d, dtype=torch.float64), torch.zeros(b, g, d, dtype=torch.float64))
        for _ in range(cfg.num_layers)
    ]
    out_segments = []
    for start in range(0, t, L):
        hidden = x[:, start : start + L]
        n = hidden.shape[1]
        for layer in range(cfg.num_layers):
            p = f"decoder.layers.{layer}."
            normed = _rms_norm(hidden, state[p + "input_layernorm.weight"], eps)
            qkv = (normed @ state[p + "self_attention.linear_qkv.weight"].T).view(b, n, g, per_group + 2, d)
            q = qkv[:, :, :, :per_group].reshape(b, n, h, d).transpose(1, 2)  # [b, h, n, d]
            k = qkv[:, :, :, per_group].transpose(1, 2)  # [b, g, n, d]
            v = qkv[:, :, :, per_group + 1].transpose(1, 2)
            qr, kr = _rope(q, cfg.rotary_base), _rope(k, cfg.rotary_base)
            M, z = memories[layer]
            gates = torch.sigmoid(state[p + "self_attention.core_attention.gate"]) if cfg.memory else None
            learned = p + "self_attention.core_attention.memory_key_log_scale" in state
            key_scales = memory_key_scale * (
                state[p + "self_attention.core_attention.memory_key_log_scale"].exp()
                if learned
                else torch.ones(g, dtype=torch.float64)
            )
            query_scales = memory_query_scale * (
                state[p + "self_attention.core_attention.memory_query_log_scale"].exp()
                if learned
                else torch.ones(h, dtype=torch.float64)
            )
            heads = []
            for head in range(h):
                kv = head // per_group
                scores = qr[:, head] @ kr[:, kv].transpose(-1, -2) / math.sqrt(d)
                scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
                local = torch.softmax(scores, dim=-1) @ v[:, kv]
                if not cfg.memory:
                    heads.append(local)
                    continue
                sq = _sigma(query_scales[head] * q[:, head])
                denominator = sq @ z[:, kv].unsqueeze(-1)
                from_memory = torch.where(
                    denominator > 0, (sq @ M[:, kv]) / denominator.clamp_min(1e-300), torch.zeros(())
                )
                heads.append(gates[head] * from_memory + (1 - gates[head]) * local)
            context = torch.stack(heads, dim=2).reshape(b, n, h * d)
            hidden = hidden + context @ state[p + "self_attention.linear_proj.weight"].T
            if n == L:
                sk = _sigma(key_scales.view(1, g, 1, 1) * k)
                if cfg.update == "linear":
                    M = M + sk.transpose(-1, -2) @ v
                else:
                    den = sk @ z.unsqueeze(-1)
                    retrieved = torch.where(den > 0, (sk @ M) / den.clamp_min(1e-300), torch.zeros(()))
                    M = M + sk.transpose(-1, -2) @ (v - retrieved)
                memories[layer] = (M, z + sk.sum(dim=2))
            normed = _rms_norm(hidden, state[p + "pre_mlp_layernorm.weight"], eps)
            gate, up = (normed @ state[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
            hidden = hidden + (F.silu(gate) * up) @ state[p + "mlp.linear_fc2.weight"].T
        out_segments.append(_rms_norm(hidden, state["decoder.final_layernorm.weight"], eps) @ output.T)
    return torch.cat(out_segments, dim=1)
