"""Data pipeline benchmark: shard writer MB/s and reader tokens/s per process.

    python bench/bench_data.py [--seconds 5] [--workdir DIR]

Corpora (no download): the interpreter's standard library (long documents, ~18 KB each) and a
synthetic corpus of short documents (200-2000 bytes cut from the same files), the hard case for
per-document overhead. Reader figures are the best of --repeats timed runs, since a shared
machine's other jobs only ever slow a run down; the load average is printed with them.
Prints markdown tables for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import DataConfig, SourceConfig, build_train_loader  # noqa: E402
from data_pipeline.make_shards import stdlib_files, write_shards  # noqa: E402


def short_docs_corpus(path: str, n_docs: int, seed: int = 0) -> None:
    """Short documents cut from stdlib sources at random (valid UTF-8: cuts on line boundaries)."""
    rng = np.random.default_rng(seed)
    lines = []
    for f in stdlib_files()[:400]:
        try:
            lines += open(f, encoding="utf-8").read().splitlines(keepends=True)
        except UnicodeDecodeError:
            continue
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(n_docs):
            start, want, text = int(rng.integers(0, len(lines))), int(rng.integers(200, 2000)), ""
            while len(text) < want:
                text += lines[start % len(lines)]
                start += 1
            out.write(json.dumps({"text": text}) + "\n")


def train_bpe(path: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for f in stdlib_files()[:200]:
        try:
            texts.append(open(f, encoding="utf-8").read())
        except UnicodeDecodeError:
            continue
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(path)
    return path


def bench_writer(inputs, out, tokenizer, workers, source=None):
    s = write_shards(
        inputs,
        out,
        tokenizer,
        workers=workers,
        shard_size="64MB",
        on_bad="skip",
        overwrite=True,
        progress=False,
        source=source,
    )
    return s


def bench_reader(index_dir: str, seconds: float, repeats: int, workers: int, lanes: int, seg: int, nseg: int) -> dict:
    """Tokens (not padding; with BPE its pad is <eos>, so <eos> is not counted) and positions per
    second delivered to the calling process, best of `repeats` runs; and the time from
    load_state_dict to the first batch."""
    cfg = DataConfig(
        sources=[SourceConfig(index_dir)],
        global_lanes=lanes,
        segment_length=seg,
        n_segments=nseg,
        num_workers=workers,
        shuffle_buffer=32,
    )
    ld = build_train_loader(cfg, 0, 1)
    best = {"positions_per_s": 0.0, "tokens_per_s": 0.0}
    for _ in range(repeats):
        next(ld)
        n = real = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b = next(ld)
            n += b["tokens"].numel()
            real += int((b["tokens"] != ld.pad_id).sum())
        dt = time.perf_counter() - t0
        if real / dt > best["tokens_per_s"]:
            best = {"positions_per_s": n / dt, "tokens_per_s": real / dt}
    state = ld.state_dict()
    epochs = ld.stats()["epochs"][0]
    ld.close()
    again = build_train_loader(cfg, 0, 1)
    again.load_state_dict(state)
    t1 = time.perf_counter()
    next(again)
    resume_s = time.perf_counter() - t1
    again.close()
    return {**best, "resume_first_batch_s": resume_s, "epochs": epochs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--short-docs", type=int, default=20000)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(work, exist_ok=True)
    rows = []

    short = os.path.join(work, "short.jsonl")
    short_docs_corpus(short, a.short_docs)
    bpe = train_bpe(os.path.join(work, "bpe.json"), 16384)
    writer = []
    for name, inputs, source in (("stdlib", [], "python-stdlib"), ("short docs", [short], None)):
        for tok_name, tok in (("bytes", "bytes"), ("BPE 16k", bpe)):
            for workers in (1, 2):
                out = os.path.join(work, f"{name.replace(' ', '_')}_{tok_name.split()[0]}")
                s = bench_writer(inputs, out, tok, workers, source)
                writer.append((name, tok_name, workers, s))
                print(
                    f"writer {name:10s} {tok_name:8s} workers={workers}: {s['input_mb_per_s']:6.1f} MB/s, "
                    f"{s['tokens_per_s'] / 1e6:5.2f} M tokens/s ({s['documents']} docs)",
                    flush=True,
                )

    for corpus in ("stdlib_bytes", "stdlib_BPE", "short_docs_bytes", "short_docs_BPE"):
        for workers in (0, 2):
            r = bench_reader(os.path.join(work, corpus), a.seconds, a.repeats, workers, lanes=16, seg=2048, nseg=4)
            rows.append((corpus, workers, r))
            print(
                f"reader {corpus:17s} num_workers={workers}: {r['tokens_per_s'] / 1e6:6.2f} M tokens/s "
                f"({r['positions_per_s'] / 1e6:6.2f} M positions/s incl. padding), resume to first batch "
                f"{r['resume_first_batch_s']:.2f} s, epochs {r['epochs']}",
                flush=True,
            )

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; date {time.strftime('%Y-%m-%d')}; load average {os.getloadavg()}"
    )
    print("\n| writer input | tokenizer | workers | MB/s of text | M tokens/s |\n|---|---|---|---|---|")
    for name, tok_name, workers, s in writer:
        print(f"| {name} | {tok_name} | {workers} | {s['input_mb_per_s']:.1f} | {s['tokens_per_s'] / 1e6:.2f} |")
    print(
        "\n| reader shards | num_workers | M tokens/s | M positions/s | resume to first batch (s) |\n"
        "|---|---|---|---|---|"
    )
    for corpus, workers, r in rows:
        print(
            f"| {corpus} | {workers} | {r['tokens_per_s'] / 1e6:.2f} | {r['positions_per_s'] / 1e6:.2f} | "
            f"{r['resume_first_batch_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
