"""Streaming generation: continue a prompt of any length with constant memory.

    python -m modeling.generate --model EXPORT_DIR (--prompt TEXT | --prompt-file F) [--max-new-tokens N]
        [--top-p P] [--temperature T] [--seed S] [--tokenizer bytes|tokenizer.json]
        [--ablate-memory | --ablate-heads L:H,...] [--dtype fp32|bf16] [--window-segments K]
        [--memory-key-scale C] [--memory-query-scale C]

The prompt is prefilled through ``StreamingModel`` a window at a time; each new token then costs one
token through the layers plus local attention over the current segment's cached keys (see
modeling/streaming.py). Greedy unless --top-p or a --temperature above 0 asks for sampling.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from modeling.streaming import StreamingModel


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
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
def continue_stream(stream: StreamingModel, logits: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                    top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                    eos_id: Optional[int] = None) -> torch.Tensor:
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


def main(argv=None) -> int:
    from training.evals.common import ablation, add_model_arguments, decode, load_for_eval

    ap = argparse.ArgumentParser(prog="python -m modeling.generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: greedy)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default 1.0 with --top-p, else greedy); 0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    text = a.prompt if a.prompt is not None else open(a.prompt_file, encoding="utf-8").read()
    temperature = a.temperature if a.temperature is not None else (1.0 if a.top_p is not None else 0.0)
    top_p = a.top_p if a.top_p is not None else 1.0
    if not 0.0 < top_p <= 1.0:
        ap.error("--top-p must be in (0, 1]")

    loaded = load_for_eval(a)
    ids = loaded.tokenizer.encode_batch([text])[0]
    prompt = torch.as_tensor(ids.astype("int64"), device=loaded.device)[None]
    generator = torch.Generator(device=loaded.device).manual_seed(a.seed)
    stream = StreamingModel(loaded.model, loaded.vocab_size, a.window_segments)
    with ablation(a, loaded.model):
        new = generate(stream, prompt, a.max_new_tokens, temperature=temperature, top_p=top_p,
                       generator=generator, eos_id=loaded.tokenizer.eos_id)
    sys.stdout.write(decode(loaded.tokenizer, new[0].tolist()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
