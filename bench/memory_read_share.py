"""How much of each head's memory read falls on the passkey needle: why retrieval fades with length.

    python bench/memory_read_share.py --model EXPORT [--lengths 512,2k,8k] [--depths 0,50] [--no-header]

A head's memory read at a query is the mean of every value written before the query's segment,
weighted sigma(q) . sigma(k). For a passkey prompt of each length and depth, this runs the model
once over the whole prompt (one forward pass: short prompts only), recomputes those weights in
float64 from every layer's q and k, and prints per layer and head the needle sentence's share of the
read: at the last prompt token (where the key's first digit is predicted) and the largest at any
token of the answer's segment, with that token's offset from the end; and, at both, how many
filler tokens one needle token weighs. The share a retrieving head needs is roughly fixed,
while the filler's total weight grows with length; that per-token ratio says how far a head's
retrieval can carry: the share at F filler tokens is n r / (n r + F) for n needle tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.tokenizer import ByteTokenizer  # noqa: E402
from modeling import layers  # noqa: E402
from modeling.cpu_compat import megatron_on_cpu  # noqa: E402
from modeling.infini_attention import sigma  # noqa: E402
from training.distributed import init_single_process  # noqa: E402
from training.evals.common import load_model  # noqa: E402
from training.evals.passkey import NEEDLE, make_prompt, parse_length, random_key  # noqa: E402


def capture_queries_and_keys(model, ids: np.ndarray) -> list:
    """[(q [h, t, d], k [g, t, d])] per layer, for one forward pass over ids."""
    captured = []
    forward = layers.InfiniCoreAttention.forward

    def capturing(self, query, key, value, **kwargs):
        captured.append((query[0].detach().cpu().double(), key[0].detach().cpu().double()))
        return forward(self, query, key, value, **kwargs)

    layers.InfiniCoreAttention.forward = capturing
    try:
        with torch.no_grad(), megatron_on_cpu():
            model(torch.as_tensor(ids, device=next(model.parameters()).device)[None])
    finally:
        layers.InfiniCoreAttention.forward = forward
    return captured


def needle_shares(q: torch.Tensor, k: torch.Tensor, needle: np.ndarray, segment_length: int):
    """Per query head: (share at the last token, largest share in its segment, that token's offset)."""
    last = q.shape[1] - 1
    start = (last // segment_length) * segment_length
    heads_per_group = q.shape[0] // k.shape[0]
    sk = sigma(k[:, :start]).repeat_interleave(heads_per_group, dim=0)
    weights = torch.einsum("hpd,htd->hpt", sigma(q[:, start:]), sk).numpy()
    share = weights[:, :, needle[:start]].sum(-1) / weights.sum(-1)
    best = share.argmax(-1)
    return [(s[-1], s[b], int(b) - (last - start)) for s, b in zip(share, best)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an export (training.export) or a checkpoint")
    ap.add_argument("--lengths", default="512,2k,8k")
    ap.add_argument("--depths", default="0,50", help="needle depths in percent")
    ap.add_argument("--no-header", action="store_true", help="prompts without the header, as make-data --no-header")
    args = ap.parse_args(argv)

    init_single_process()
    model, cfg = load_model(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ByteTokenizer()
    depths = [float(d) for d in args.depths.split(",")]
    print(f"{args.model}: needle share of each head's memory read, per depth {args.depths}%: at the last token | "
          "largest in the answer's segment (offset from the end)")
    span = len(NEEDLE.format(key="12345"))
    for length in (parse_length(x) for x in args.lengths.split(",")):
        in_memory = (length - 1) // cfg.segment_length * cfg.segment_length
        per_head = {}
        for trial, depth in enumerate(depths):
            key = random_key(np.random.default_rng(trial))
            ids = make_prompt(tokenizer, length, depth / 100, key, header=not args.no_header)
            text = ids.astype(np.uint8).tobytes().decode("ascii")
            at = text.index(NEEDLE.format(key=key))
            needle = np.zeros(length, bool)
            needle[at:at + span] = True
            if at + span > in_memory:
                raise SystemExit(f"length {length}, depth {depth}: the needle is in the answer's segment")
            for layer, (q, k) in enumerate(capture_queries_and_keys(model, ids)):
                for head, row in enumerate(needle_shares(q, k, needle, cfg.segment_length)):
                    per_head.setdefault((layer, head), []).append(row)
        print(f"\nlength {length} ({in_memory} tokens in memory, {span} in the needle sentence)")
        print("| layer | head | share at the last token | largest | offset "
              "| needle / filler per token: last | largest |")
        print("| ---: | ---: | --- | --- | --- | --- | --- |")
        per_token = lambda share: share / span / ((1 - share) / (in_memory - span))  # noqa: E731
        for (layer, head), rows in sorted(per_head.items()):
            cells = [" ".join(f"{r[0]:.3f}" for r in rows), " ".join(f"{r[1]:.3f}" for r in rows),
                     " ".join(str(r[2]) for r in rows), " ".join(f"{per_token(r[0]):.1f}" for r in rows),
                     " ".join(f"{per_token(r[1]):.1f}" for r in rows)]
            print(f"| {layer} | {head} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
