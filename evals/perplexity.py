"""Loss and perplexity by position bucket on long documents, with and without the memory.

    python -m evals.perplexity --model DIR (--shards DIR | --text FILE [FILE ...])
        [--buckets 1k,4k,16k,64k,256k,1m] [--max-docs N] [--min-doc-tokens N] [--max-doc-tokens N]
        [--no-ablation] [--segment-bins K] [--out DIR] [--tokenizer T] [--dtype auto|fp32|bf16] [--device D]
        [--window-segments K]

Every document streams through the model a window at a time (constant memory whatever its length);
the loss of the token at position p (predicted from positions < p) counts in the bucket holding p.
Buckets are cut at the given edges: [0, 1K), [1K, 4K), ..., [last, end). Unless --no-ablation, each
document is scored a second time with the gates forced local: past the first segment the gap
between the two columns is what the compressive memory contributes. A model without the memory
(model.memory=false) is scored once: each token sees its own segment only. --shards reads a shard set
written by data_pipeline (its tokenizer); --text reads UTF-8 files, one document each. With
--segment-bins K, a second table cuts the positions past each document's first segment by where they
sit in their segment, K bins of segment_length / K: it shows which tokens the memory helps (those at a
segment's start see little through local attention) and which it costs. Writes DIR/perplexity.json and
DIR/perplexity.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from evals.passkey import format_length, parse_length

DEFAULT_BUCKETS = "1k,4k,16k,64k,256k,1m"


def shard_documents(path: str) -> Iterator[np.ndarray]:
    """Every document of a shard set, in index order."""
    from data_pipeline.shards import BadSamples, open_shard_set, read_documents

    shard_set = open_shard_set(path)
    for shard in range(len(shard_set.names)):
        wanted = np.arange(int(shard_set.n_docs[shard]))
        for _, tokens, _weights in read_documents(shard_set, shard, wanted, 0, BadSamples("error")):
            yield np.asarray(tokens, dtype=np.int64)


def text_documents(paths: Sequence[str], tokenizer) -> Iterator[np.ndarray]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield np.asarray(tokenizer.encode_batch([f.read()])[0], dtype=np.int64)


def bucket_names(edges: Sequence[int]) -> List[str]:
    bounds = [0] + list(edges)
    names = [f"[{format_length(a)}, {format_length(b)})" for a, b in zip(bounds[:-1], bounds[1:])]
    return names + [f"[{format_length(bounds[-1])}, end)"]


def token_losses(stream, tokens: np.ndarray, device) -> np.ndarray:
    """Negative log-likelihood of tokens[1:] (positions 1..n-1) in float64, on a fresh stream."""
    stream.reset()
    ids = torch.as_tensor(tokens, device=device)[None]
    return (-stream.score(ids)[0]).double().cpu().numpy()


def evaluate(
    loaded,
    documents: Iterator[np.ndarray],
    edges: Sequence[int],
    *,
    ablation: bool = True,
    window_segments: int = 16,
    segment_bins: int = 0,
    log=print,
) -> dict:
    """Per bucket: tokens, mean loss and perplexity (and the same with the memory ablated, for a model
    that has the memory); with segment_bins > 0 the same per bin of the position within its segment, over
    the positions past each document's first segment."""
    from modeling.streaming import StreamingModel, memory_ablated

    ablation = ablation and loaded.config.memory
    stream = StreamingModel(loaded.model, loaded.vocab_size, window_segments)
    variants = ["memory"] + (["ablated"] if ablation else [])
    n_buckets = len(edges) + 1
    sums = {v: np.zeros(n_buckets) for v in variants}
    counts = np.zeros(n_buckets, dtype=np.int64)
    segment = loaded.config.segment_length
    bin_sums = {v: np.zeros(segment_bins) for v in variants}
    bin_counts = np.zeros(segment_bins, dtype=np.int64)
    n_docs, started = 0, time.perf_counter()
    for tokens in documents:
        if len(tokens) < 2:
            continue
        positions = np.arange(1, len(tokens))
        bucket = np.searchsorted(np.asarray(edges), positions, side="right")
        counts += np.bincount(bucket, minlength=n_buckets)
        # Positions past the document's first segment, by bin; none when segment_bins is 0.
        binned = (positions >= segment) & (segment_bins > 0)
        in_segment = (positions[binned] % segment) * segment_bins // segment
        bin_counts += np.bincount(in_segment, minlength=segment_bins)
        for variant in variants:
            if variant == "ablated":
                with memory_ablated(loaded.model):
                    losses = token_losses(stream, tokens, loaded.device)
            else:
                losses = token_losses(stream, tokens, loaded.device)
            sums[variant] += np.bincount(bucket, weights=losses, minlength=n_buckets)
            bin_sums[variant] += np.bincount(in_segment, weights=losses[binned], minlength=segment_bins)
        n_docs += 1
        log(f"document {n_docs}: {len(tokens)} tokens ({time.perf_counter() - started:.0f} s)")
    bin_names = [f"[{segment * i // segment_bins}, {segment * (i + 1) // segment_bins})" for i in range(segment_bins)]
    return {
        "edges": list(edges),
        "documents": n_docs,
        "buckets": _rows(bucket_names(edges), sums, counts),
        "segment_positions": _rows(bin_names, bin_sums, bin_counts),
        "ablation": ablation,
        "memory": loaded.config.memory,
        "seconds": time.perf_counter() - started,
    }


def _rows(names: Sequence[str], sums: dict, counts: np.ndarray) -> List[dict]:
    rows = []
    for i, name in enumerate(names):
        row = {"bucket": name, "tokens": int(counts[i])}
        for variant, variant_sums in sums.items():
            loss = variant_sums[i] / counts[i] if counts[i] else float("nan")
            row[f"loss_{variant}"], row[f"ppl_{variant}"] = loss, math.exp(min(loss, 50.0))
        rows.append(row)
    return rows


def markdown_table(result: dict, rows: str = "buckets", label: str = "positions") -> str:
    ablation = result["ablation"]
    header = f"| {label} | tokens | loss | ppl |" + (
        " loss, memory ablated | ppl, memory ablated |" if ablation else ""
    )
    lines = [header, "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if ablation else "")]
    for row in result[rows]:
        if not row["tokens"]:
            continue
        line = f"| {row['bucket']} | {row['tokens']} | {row['loss_memory']:.4f} | {row['ppl_memory']:.3f} |"
        if ablation:
            line += f" {row['loss_ablated']:.4f} | {row['ppl_ablated']:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from evals.common import add_model_arguments, load_for_eval

    ap = argparse.ArgumentParser(prog="python -m evals.perplexity", description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", metavar="DIR", help="a shard set (directory or index.json)")
    source.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files, one document each")
    ap.add_argument("--buckets", default=DEFAULT_BUCKETS, help=f"bucket edges (default {DEFAULT_BUCKETS})")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--min-doc-tokens", type=int, default=2, help="skip shorter documents")
    ap.add_argument("--max-doc-tokens", type=int, default=None, help="score only each document's first N tokens")
    ap.add_argument("--no-ablation", action="store_true", help="skip the memory-ablated pass")
    ap.add_argument(
        "--segment-bins",
        type=int,
        default=0,
        metavar="K",
        help="also the loss past each document's first segment by position within the segment, K bins",
    )
    ap.add_argument("--out", default=None, metavar="DIR", help="default: <model>/perplexity")
    a = ap.parse_args(argv)
    if a.ablate_memory or a.ablate_heads:
        ap.error(
            "--ablate-memory and --ablate-heads do not apply: the ablated pass runs beside the normal one "
            "(see --no-ablation)"
        )
    try:
        edges = [parse_length(x) for x in a.buckets.split(",")]
    except ValueError as error:
        ap.error(str(error))
    if edges != sorted(set(edges)) or edges[0] <= 0:
        ap.error("--buckets must be increasing positive edges")
    loaded = load_for_eval(a)
    if not 0 <= a.segment_bins <= loaded.config.segment_length:
        ap.error(
            f"--segment-bins must be between 0 and the segment length ({loaded.config.segment_length}), "
            f"got {a.segment_bins}"
        )
    docs = shard_documents(a.shards) if a.shards else text_documents(a.text, loaded.tokenizer)

    def selected():
        taken = 0
        for tokens in docs:
            if a.max_docs is not None and taken >= a.max_docs:
                return
            if len(tokens) >= a.min_doc_tokens:
                taken += 1
                yield tokens[: a.max_doc_tokens] if a.max_doc_tokens else tokens

    result = evaluate(
        loaded,
        selected(),
        edges,
        ablation=not a.no_ablation,
        window_segments=a.window_segments,
        segment_bins=a.segment_bins,
    )
    result.update(
        model=a.model,
        source=a.shards or a.text,
        segment_length=loaded.config.segment_length,
        memory_key_scale=a.memory_key_scale,
        memory_query_scale=a.memory_query_scale,
    )
    out = a.out or os.path.join(a.model, "perplexity")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "perplexity.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown_table(result)
    if a.segment_bins:
        table += (
            f"\nPast the first segment, by position within the segment of {loaded.config.segment_length}:\n\n"
            + markdown_table(result, "segment_positions", "in segment")
        )
    with open(os.path.join(out, "perplexity.md"), "w") as f:
        f.write(f"loss by position, {a.model} ({result['documents']} documents)\n\n{table}")
    print(table)
    print(f"wrote {out}/perplexity.json and perplexity.md ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
