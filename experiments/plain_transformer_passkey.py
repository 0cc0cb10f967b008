"""A plain PyTorch transformer on passkey documents: how fast should copying the key be learned?

    python experiments/plain_transformer_passkey.py DATA/passkey.jsonl [--window 512] [--steps 600] [--lr 2e-3]

An independent reference for the passkey recipe (docs/long-context.md): a small causal transformer
(LayerNorm, GELU, RoPE, PyTorch's default initialisation, no memory) trained on the documents of
`python -m evals.passkey make-data` (one document per row, cut or padded to --window bytes,
the make-data loss weights applied), printing the weighted loss and the key digits' own loss. When
the documents fit the window, the answers can all be copied from view; a model that does not learn
that within a few hundred steps has a training problem, not a memory problem.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EOS, VOCAB = 256, 258


def load_rows(path: str, window: int):
    """Per document: byte ids with <eos> ([window + 1]), the labels' loss weights, and which labels are key digits."""
    ids, weights, digits = [], [], []
    with open(path) as f:
        for line in f:
            doc = json.loads(line)
            tokens = np.frombuffer(doc["text"].encode(), dtype=np.uint8).astype(np.int64)
            row = np.full(window + 1, EOS, dtype=np.int64)
            row[: min(len(tokens), window + 1)] = tokens[: window + 1]
            weight = np.zeros(window + 1, dtype=np.float32)
            weight[: min(len(tokens) + 1, window + 1)] = 1.0
            digit = np.zeros(window + 1, dtype=bool)
            for start, end, w in doc.get("loss_weights", []):
                weight[start:end], digit[start:end] = w, True
            ids.append(row)
            weights.append(weight)
            digits.append(digit)
    return np.stack(ids), np.stack(weights), np.stack(digits)


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))

    def forward(self, x, cos, sin):
        b, t, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, hidden // self.heads).unbind(2)
        q, k, v = rotate(q, cos, sin).transpose(1, 2), rotate(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, hidden)
        x = x + self.out(attended)
        return x + self.mlp(self.norm2(x))


class PlainLM(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.embed = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, VOCAB)

    def forward(self, ids):
        half = self.head_dim // 2
        angles = torch.arange(ids.shape[1])[:, None] / 10000 ** (torch.arange(half) / half)[None]
        cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up, then cosine to 5%% of --lr")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    ids, weights, digits = load_rows(a.jsonl, a.window)
    model = PlainLM(a.layers, a.hidden, a.heads, ffn=int(2.75 * a.hidden))
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(a.seed)
    print("| step | weighted loss | key digits' loss (nats) |\n| ---: | ---: | ---: |")
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / max(1, a.warmup)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = rng.integers(0, len(ids), a.batch)
        batch = torch.from_numpy(ids[rows])
        weight, digit = torch.from_numpy(weights[rows][:, 1:]), torch.from_numpy(digits[rows][:, 1:])
        losses = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        losses = losses.view(a.batch, -1)
        loss = (losses * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == a.steps:
            print(f"| {step} | {loss.item():.4f} | {losses[digit].mean().item():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
