"""Continue a prompt of any length with constant memory (``modeling.generate``), from the command line.

    python -m evals.generate --model EXPORT_DIR (--prompt TEXT | --prompt-file F) [--max-new-tokens N]
        [--top-p P] [--temperature T] [--seed S] [--tokenizer bytes|tokenizer.json]
        [--ablate-memory | --ablate-heads L:H,...] [--dtype fp32|bf16] [--window-segments K]
        [--memory-key-scale C] [--memory-query-scale C]

Greedy unless --top-p or a --temperature above 0 asks for sampling.
"""

from __future__ import annotations

import argparse
import sys

import torch

from evals.common import ablation, add_model_arguments, decode, load_for_eval
from modeling.generate import generate
from modeling.streaming import StreamingModel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: greedy)")
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default 1.0 with --top-p, else greedy); 0 = greedy",
    )
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
        new = generate(
            stream,
            prompt,
            a.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            eos_id=loaded.tokenizer.eos_id,
        )
    sys.stdout.write(decode(loaded.tokenizer, new[0].tolist()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
