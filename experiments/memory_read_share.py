"""How much of each head's memory read falls on the passkey needle: why retrieval fades with length.

    python experiments/memory_read_share.py --model EXPORT [--lengths 512,2k,8k] [--depths 0,50] [--no-header]
        [--reference-memory 1k] [--memory-key-scale C] [--memory-query-scale C]

A head's memory read at a query is the mean of every value written before the query's segment,
weighted sigma(q) . sigma(k). For a passkey prompt of each length and depth, this runs the model
once over the whole prompt (one forward pass: short prompts only), recomputes those weights in
float64 from every layer's q and k, and prints per layer and head the needle sentence's share of the
read: at the last prompt token (where the key's first digit is predicted) and the largest at any
token of the answer's segment, with that token's offset from the end; and, at both, how many
filler tokens one needle token weighs. The share a retrieving head needs is roughly fixed,
while the filler's total weight grows with length; that per-token ratio says how far a head's
retrieval can carry: the share at F filler tokens is n r / (n r + F) for n needle tokens.

What the memory holds of the needle may depend on when it is written, too: the lower layers' reads
of the memory shape the upper layers' keys and values. The last two columns compare the needle's
sigma(k) and v, per head, with the same needle written into a short memory: the same prompt cut to
start --reference-memory tokens before the needle's segment (same segment, same local context):
their cosine, averaged over the needle's tokens (1: memory fullness does not change the write).
The weights use q and k scaled as the memory reads and writes them: with the model's learned scales
(model.learned_memory_scales) sigma(b q) . sigma(a k) per head, and --memory-key-scale C and
--memory-query-scale C multiply on top, as at evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.tokenizer import ByteTokenizer  # noqa: E402
from evals.common import load_model, positive_float  # noqa: E402
from evals.passkey import NEEDLE, make_prompt, parse_length, random_key  # noqa: E402
from modeling import layers  # noqa: E402
from modeling.cpu_compat import megatron_on_cpu  # noqa: E402
from modeling.infini_attention import sigma  # noqa: E402
from training.distributed import init_single_process  # noqa: E402


def per_head(scale, heads: int) -> torch.Tensor:
    """A memory scale (a number, or a tensor of one per head) as float64 [heads, 1, 1]."""
    return torch.as_tensor(scale, dtype=torch.float64).detach().cpu().expand(heads).reshape(heads, 1, 1)


def capture_attention_inputs(model, ids: np.ndarray) -> list:
    """[(q [h, t, d], k [g, t, d], v [g, t, d])] per layer, for one forward pass over ids, with q and k
    multiplied by the scales the layer's memory reads and writes with (learned and configured)."""
    captured = []
    forward = layers.InfiniCoreAttention.forward

    def capturing(self, query, key, value, **kwargs):
        q, k, v = (x[0].detach().cpu().double() for x in (query, key, value))
        key_scale, query_scale = self.memory_scales()
        captured.append((q * per_head(query_scale, q.shape[0]), k * per_head(key_scale, k.shape[0]), v))
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


def needle_drift(k, v, needle, k_ref, v_ref, needle_ref, heads: int):
    """Per query head: mean cosine over the needle's tokens of its sigma(k) and v against the reference's."""
    cos_k = F.cosine_similarity(sigma(k[:, needle]), sigma(k_ref[:, needle_ref]), dim=-1).mean(-1)
    cos_v = F.cosine_similarity(v[:, needle], v_ref[:, needle_ref], dim=-1).mean(-1)
    per_group = heads // k.shape[0]
    return list(zip(cos_k.repeat_interleave(per_group).tolist(), cos_v.repeat_interleave(per_group).tolist()))


def short_memory_prompt(ids: np.ndarray, needle: np.ndarray, segment_length: int, memory_tokens: int):
    """ids cut to start memory_tokens (whole segments) before the needle's first segment and to end with its
    last one, and the needle's mask there."""
    at = np.flatnonzero(needle)
    first = at[0] // segment_length * segment_length
    end = -(-(at[-1] + 1) // segment_length) * segment_length
    start = max(0, first - memory_tokens // segment_length * segment_length)
    return ids[start:end], needle[start:end]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an export (training.export) or a checkpoint")
    ap.add_argument("--lengths", default="512,2k,8k")
    ap.add_argument("--depths", default="0,50", help="needle depths in percent")
    ap.add_argument("--no-header", action="store_true", help="prompts without the header, as make-data --no-header")
    ap.add_argument(
        "--reference-memory",
        default="1k",
        help="tokens before the needle's segment in the short prompt its k and v are compared with",
    )
    ap.add_argument(
        "--memory-key-scale", type=positive_float, default=1.0, metavar="C", help="write sigma(C k) (1: the paper)"
    )
    ap.add_argument(
        "--memory-query-scale", type=positive_float, default=1.0, metavar="C", help="read sigma(C q) (1: the paper)"
    )
    args = ap.parse_args(argv)

    init_single_process()
    model, cfg = load_model(
        args.model,
        "cuda" if torch.cuda.is_available() else "cpu",
        memory_key_scale=args.memory_key_scale,
        memory_query_scale=args.memory_query_scale,
    )
    tokenizer = ByteTokenizer()
    depths = [float(d) for d in args.depths.split(",")]
    print(
        f"{args.model}: needle share of each head's memory read, per depth {args.depths}%: at the last token | "
        "largest in the answer's segment (offset from the end)"
    )
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
            needle[at : at + span] = True
            if at + span > in_memory:
                raise SystemExit(f"length {length}, depth {depth}: the needle is in the answer's segment")
            reference_ids, needle_ref = short_memory_prompt(
                ids, needle, cfg.segment_length, parse_length(args.reference_memory)
            )
            reference = capture_attention_inputs(model, reference_ids)
            for layer, ((q, k, v), (_, k_ref, v_ref)) in enumerate(
                zip(capture_attention_inputs(model, ids), reference)
            ):
                shares = needle_shares(q, k, needle, cfg.segment_length)
                drift = needle_drift(k, v, needle, k_ref, v_ref, needle_ref, q.shape[0])
                for head, row in enumerate(zip(shares, drift)):
                    per_head.setdefault((layer, head), []).append(row[0] + row[1])
        print(f"\nlength {length} ({in_memory} tokens in memory, {span} in the needle sentence)")
        print(
            "| layer | head | share at the last token | largest | offset "
            "| needle / filler per token: last | largest | needle cos sigma(k) | needle cos v |"
        )
        print("| ---: | ---: | --- | --- | --- | --- | --- | --- | --- |")
        per_token = lambda share: share / span / ((1 - share) / (in_memory - span))  # noqa: E731
        for (layer, head), rows in sorted(per_head.items()):
            cells = [
                " ".join(f"{r[0]:.3f}" for r in rows),
                " ".join(f"{r[1]:.3f}" for r in rows),
                " ".join(str(r[2]) for r in rows),
                " ".join(f"{per_token(r[0]):.1f}" for r in rows),
                " ".join(f"{per_token(r[1]):.1f}" for r in rows),
                " ".join(f"{r[3]:.3f}" for r in rows),
                " ".join(f"{r[4]:.3f}" for r in rows),
            ]
            print(f"| {layer} | {head} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
