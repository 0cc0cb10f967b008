"""Throughput and memory against document length: the Infini model's cost per token should not depend on it.

Builds byte-level shards of documents of exactly N tokens (this interpreter's standard library
source, concatenated), then runs the same short training run as bench/throughput.py on each:
every lane carries its document's memory across windows, so a 1M-token document is 64 windows of
16K tokens, each starting from the memory the previous one left.

    python bench/long_documents.py --case infini-1.3b --lengths 8192,131072,1048576 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.throughput import run_case  # noqa: E402
from data_pipeline.make_shards import stdlib_files, write_shards  # noqa: E402


def make_documents(out_dir: str, length: int, count: int) -> str:
    """`count` text documents of `length` bytes (= tokens with the byte tokenizer, less the appended <eos>)."""
    text_dir = os.path.join(out_dir, f"text-{length}")
    os.makedirs(text_dir, exist_ok=True)
    sources = iter(stdlib_files())
    for index in range(count):
        parts, size = [], 0
        while size < length:
            chunk = open(next(sources), "rb").read().decode("utf-8", "ignore")
            parts.append(chunk)
            size += len(chunk.encode())
        document = "".join(parts).encode()[: length - 1].decode("utf-8", "ignore")
        with open(os.path.join(text_dir, f"doc{index:04d}.txt"), "w") as f:
            f.write(document)
    shards = os.path.join(out_dir, f"shards-{length}")
    write_shards([text_dir], shards, "bytes", overwrite=True, progress=False)
    return shards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="infini-1.3b")
    parser.add_argument("--lengths", default="8192,131072,1048576")
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", default="runs/bench-long")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    window = 8 * 2048
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        # Enough documents that no lane runs dry during the run.
        count = args.lanes * max(1, -(-args.steps * window // length))
        shards = make_documents(args.out, length, count)
        result = run_case(
            args.case,
            args.steps,
            args.warmup,
            args.out,
            [
                f"data.sources=[{{path: {shards}}}]",
                f"data.global_lanes={args.lanes}",
                "data.shuffle_buffer=1",
                "build_stdlib_shards=false",
            ],
            tag=f"doc{length}",
        )
        result["document_tokens"] = length
        results.append(result)
        print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, "long_documents.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| document tokens | tokens/s | MFU (ours) | peak GiB | padding | data wait ms a step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['document_tokens']:,} | error | | | {r['error'][-150:]!r} | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(
                f"| {r['document_tokens']:,} | {r['tokens_per_s']:,.0f} | {mfu} | "
                f"{r['peak_memory_gb']:.1f} | {100 * r['padding_fraction']:.1f}% | {r['data_wait_ms']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
