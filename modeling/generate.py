"""Streaming generation: continue a prompt of any length with constant memory (CLI: ``evals.generate``).

The prompt is prefilled through ``StreamingModel`` a window at a time; each new token then costs one
token through the layers plus local attention over the current segment's cached keys (see
modeling/streaming.py). Greedy unless top_p or a temperature above 0 asks for sampling.
"""

from __future__ import annotations

from typing import Optional

import torch

from modeling.streaming import StreamingModel


def next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Token ids [b] from logits [b, vocab]: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(stream: StreamingModel, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """New token ids [b, <= max_new_tokens] continuing prompt [b, n] (n >= 1) on a fresh stream.
    sampling: temperature, top_p, generator, eos_id (see ``continue_stream``)."""
    stream.reset()
    return continue_stream(stream, stream.prefill(prompt), max_new_tokens, **sampling)


@torch.no_grad()
def continue_stream(
    stream: StreamingModel,
    logits: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    eos_id: Optional[int] = None,
) -> torch.Tensor:
    """New token ids [b, <= max_new_tokens] after a stream whose last logits [b, vocab] are given.

    Stops early once every row has produced eos_id; rows that finished earlier repeat eos_id.
    """
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        if step:
            logits = stream.feed(out[-1][:, None])[:, -1]
        token = next_token(logits, temperature, top_p, generator)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        out.append(token)
        if eos_id is not None and bool(done.all()):
            break
    return torch.stack(out, dim=1) if out else logits.new_zeros(logits.shape[0], 0, dtype=torch.long)
