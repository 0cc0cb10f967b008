"""Per-token loss weights: character spans in the input, token runs in the shards, arrays in the reader.

An input document may carry `[[start_char, end_char, weight], ...]`: half-open character ranges of
its text, not overlapping, weight a finite number >= 0; characters outside every span weigh 1. A
token weighs the largest weight among the characters it covers, so a token that carries any part
of a span takes the span's weight when that is larger than its other characters' (a key split
across tokens is weighted whole) and never falls below a character it shares with unweighted text.
Shards store, per weighted document, the runs of tokens whose weight is not 1 as
`[[start_token, end_token, weight], ...]` (see shards.py); a document whose tokens all weigh 1
stores nothing, so its shard bytes are those of a document without weights.
"""

from __future__ import annotations

import json
import math
from numbers import Real
from typing import List, Sequence, Tuple

import numpy as np

Span = Tuple[int, int, float]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_weight(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def check_spans(value, length: int, unit: str) -> List[Span]:
    """`value` as sorted spans over `length` units (characters or tokens); ValueError naming the
    first bad span otherwise."""
    if not isinstance(value, list):
        raise ValueError(f"must be a list of [start, end, weight], not {type(value).__name__}")
    spans = []
    for i, span in enumerate(value):
        if not (isinstance(span, list) and len(span) == 3 and _is_int(span[0]) and _is_int(span[1])):
            raise ValueError(f"span {i} {json.dumps(span)} is not [start, end, weight] with integer start and end")
        start, end, weight = span
        if not _is_weight(weight):
            raise ValueError(f"span {i} {json.dumps(span)}: the weight must be a finite number >= 0")
        if not 0 <= start < end <= length:
            raise ValueError(f"span {i} {json.dumps(span)} is not a non-empty range within the {length} {unit}s")
        spans.append((start, end, float(weight)))
    spans.sort()
    for (_, prev_end, _), (start, _, _) in zip(spans, spans[1:]):
        if start < prev_end:
            raise ValueError(f"spans overlap: one ends at {unit} {prev_end}, another starts at {start}")
    return spans


def token_weights(spans: Sequence[Span], token_offsets: np.ndarray, n_chars: int) -> np.ndarray:
    """float32 weight per token, from character spans and each token's [start, end) characters.
    A token with an empty range (it covers no character) counts as covering the one it starts at."""
    starts = token_offsets[:, 0].astype(np.int64)
    ends = np.maximum(token_offsets[:, 1].astype(np.int64), np.minimum(starts + 1, n_chars))
    # The text as runs of constant weight: the spans and the gaps (weight 1) between them.
    runs, at = [], 0
    for start, end, weight in spans:
        if start > at:
            runs.append((at, start, 1.0))
        runs.append((start, end, weight))
        at = end
    if at < n_chars:
        runs.append((at, n_chars, 1.0))
    out = np.full(len(starts), -np.inf, dtype=np.float64)
    for start, end, weight in runs:
        overlaps = (starts < end) & (ends > start)
        out[overlaps] = np.maximum(out[overlaps], weight)
    return out.astype(np.float32)


def weight_runs(weights: np.ndarray) -> List[list]:
    """The runs of equal weight other than 1, as [start, end, weight] (token indices)."""
    if len(weights) == 0:
        return []
    change = np.flatnonzero(weights[1:] != weights[:-1]) + 1
    bounds = np.concatenate([[0], change, [len(weights)]])
    return [[int(a), int(b), float(weights[a])] for a, b in zip(bounds[:-1], bounds[1:]) if weights[a] != 1.0]


def expand_runs(runs: Sequence[Span], n_tokens: int) -> np.ndarray:
    """float32 weight per token from checked token runs (check_spans)."""
    out = np.ones(n_tokens, dtype=np.float32)
    for start, end, weight in runs:
        out[start:end] = weight
    return out
