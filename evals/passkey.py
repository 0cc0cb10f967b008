"""Passkey retrieval (Mohtashami & Jaggi 2023, the format of Infini-attention's Table 3), streamed.

    python -m evals.passkey --model DIR [--lengths 1k,2k,4k,...,1m] [--depths 0,25,50,75,100]
        [--trials N] [--out DIR] [--ablate-memory | --ablate-heads L:H,...] [--batch-size B] [--seed S]
        [--tokenizer T] [--dtype auto|fp32|bf16] [--device D] [--window-segments K]
    python -m evals.passkey make-data --out DIR --docs N [--max-len 8192] [--min-len N]
        [--questions Q] [--answer-weight W] [--no-header] [--distractors N] [--near SHARE] [--seed S]
    python -m evals.passkey report --memory DIR --ablated DIR --model EXPORT --out FILE
        [--train-dirs RUN_DIR...] [--train-seconds S] [--total-seconds S]

A trial is L tokens: the prompt (a task description, filler sentences repeated, the needle "The
pass key is NNNNN. Remember it. NNNNN is the pass key." at depth d, the share of the filler before
it, more filler, and "What is the pass key? The pass key is") and the answer decoded greedily (the
key's tokens and one more). The model streams the prompt a window at a time (memory is constant
whatever L); a trial is correct when the continuation starts with exactly the key's digits. Beside
the accuracy: the answer's loss, teacher-forced, in nats per key digit (ln 10 = 2.30 at chance),
which shows retrieval emerging before greedy decoding gets all five digits right. Keys depend only
on (seed, L, d, trial), so a run with --ablate-memory sees the same prompts, as does one with
--ablate-heads, which forces only the listed heads local (which heads retrieval depends on). Writes
DIR/passkey.json (every trial), DIR/passkey.md (accuracy and answer loss, depth x length) and
DIR/passkey_heatmap.png (accuracy).

make-data writes training documents in the same format (random length, depth and key, the answer
after the question; --questions Q asks Q times, at random places after the needle and at the end)
as DIR/passkey.jsonl and byte-level shards in DIR/shards; --answer-weight W gives the key digits of
every answer loss weight W (default 1: no weights). report puts a run with memory and one with
--ablate-memory side by side (docs/long-context.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from training.metrics import training_steps

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DISTRACTOR = " The room number is {number}."
# make-data --near: how close after the needle a near question starts (bytes, so tokens, of text).
NEAR_BYTES = 256
DEFAULT_LENGTHS = "1k,2k,4k,8k,16k,32k,64k,128k,256k,512k,1m"
DEFAULT_DEPTHS = "0,25,50,75,100"
_UNITS = {"": 1, "k": 1024, "m": 1024**2}


def parse_length(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"not a length: {text!r} (e.g. 4096, 4k, 1m)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_length(n: int) -> str:
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode_batch([text])[0], dtype=np.int64)


def random_key(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10000, 100000)))


def make_prompt(tokenizer, length: int, depth: float, key: str, header: bool = True) -> np.ndarray:
    """Token ids of exactly `length` tokens; depth in [0, 1] places the needle in the filler. Without
    the header, the prompt is filler, needle and question alone."""
    intro, needle, question = (
        _encode(tokenizer, t) for t in (HEADER if header else "", NEEDLE.format(key=key), QUESTION)
    )
    fixed = len(intro) + len(needle) + len(question)
    if length < fixed:
        raise ValueError(f"a passkey prompt needs at least {fixed} tokens, got length {length}")
    sentences = [_encode(tokenizer, " " + t.strip() + ".") for t in FILLER.split(".") if t.strip()]
    unit = np.concatenate(sentences)
    filler = np.resize(unit, length - fixed)
    # The needle goes before a filler sentence (or at the very end), at the start nearest the depth.
    ends = np.cumsum([0] + [len(t) for t in sentences[:-1]])
    starts = (np.arange(len(filler) // len(unit) + 1)[:, None] * len(unit) + ends[None, :]).ravel()
    starts = np.append(starts[starts < len(filler)], len(filler))
    before = int(starts[np.abs(starts - depth * len(filler)).argmin()])
    return np.concatenate([intro, filler[:before], needle, filler[before:], question])


def read_answer(continuation: str) -> Optional[str]:
    """The digits the continuation starts with (after spaces), or None."""
    match = re.match(r"\s*(\d+)", continuation)
    return match.group(1) if match else None


def trial_key(seed: int, length: int, depth_percent: float, trial: int) -> str:
    return random_key(np.random.default_rng([seed, length, int(round(depth_percent * 1000)), trial]))


def answer_losses(stream, last_logits: torch.Tensor, answers: List[np.ndarray]) -> List[float]:
    """Per row, the negative log-likelihood (nats) of its answer tokens after the prompt the stream
    holds (whose last logits are given), teacher-forced. The stream is left after the answers."""
    longest = max(len(a) for a in answers)
    # Rows are padded at the end; a position's logits never depend on the tokens after it.
    ids = torch.zeros(len(answers), longest, dtype=torch.long, device=last_logits.device)
    for row, answer in enumerate(answers):
        ids[row, : len(answer)] = torch.from_numpy(answer)
    logits = torch.cat([last_logits[:, None], stream.feed(ids)[:, :-1]], dim=1)
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]
    return [-float(logprobs[row, : len(answer)].sum()) for row, answer in enumerate(answers)]


def evaluate(
    loaded,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    window_segments: int = 16,
    header: bool = True,
    log=print,
) -> dict:
    """Per (length, depth percent): accuracy of greedy decoding and the answer's loss (nats per key
    digit, teacher-forced: a graded measure, ln 10 = 2.30 at chance), and every trial."""
    from evals.common import decode
    from modeling.generate import continue_stream
    from modeling.streaming import StreamingModel

    stream = StreamingModel(loaded.model, loaded.vocab_size, window_segments)
    # The answer's own tokens plus one, so "12345" cannot pass as a prefix of a longer number. The
    # prompt and these make `length` tokens: were the answer to start a segment (as a prompt of
    # whole segments would make it), local attention could never see the question while answering.
    new_tokens = len(_encode(loaded.tokenizer, " 12345")) + 1
    rows: List[dict] = []
    started = time.perf_counter()
    for length in lengths:
        cases = [(d, t, trial_key(seed, length, d, t)) for d in depths for t in range(trials)]
        t0 = time.perf_counter()
        for i in range(0, len(cases), batch_size):
            batch = cases[i : i + batch_size]
            prompts = np.stack(
                [make_prompt(loaded.tokenizer, length - new_tokens, d / 100.0, key, header) for d, _, key in batch]
            )
            stream.reset()
            last = stream.prefill(torch.from_numpy(prompts).to(loaded.device))
            prompted = stream.snapshot()
            losses = answer_losses(stream, last, [_encode(loaded.tokenizer, f" {key}") for _, _, key in batch])
            stream.restore(prompted)
            out = continue_stream(stream, last, new_tokens)
            for (depth, trial, key), ids, loss in zip(batch, out.tolist(), losses):
                text = decode(loaded.tokenizer, ids)
                rows.append(
                    {
                        "length": length,
                        "depth": depth,
                        "trial": trial,
                        "key": key,
                        "output": text,
                        "output_ids": ids,
                        "correct": read_answer(text) == key,
                        "answer_nll": loss / len(key),
                    }
                )
        done = [r for r in rows if r["length"] == length]
        log(
            f"length {format_length(length):>5}: accuracy {np.mean([r['correct'] for r in done]):6.1%}, "
            f"answer {np.mean([r['answer_nll'] for r in done]):.3f} nats/digit "
            f"({len(done)} trials, {time.perf_counter() - t0:.1f} s)"
        )

    def mean_of(field):
        return {
            length: {
                depth: float(np.mean([r[field] for r in rows if r["length"] == length and r["depth"] == depth]))
                for depth in depths
            }
            for length in lengths
        }

    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "accuracy": mean_of("correct"),
        "answer_nll": mean_of("answer_nll"),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def markdown_table(result: dict, field: str = "accuracy") -> str:
    """A row per depth, a column per length, and the mean over depths: accuracy in percent, or
    (field "answer_nll") the answer's loss in nats per key digit."""
    lengths, depths, values = result["lengths"], result["depths"], result[field]

    def cell(v):
        return f"{100 * v:.1f}" if field == "accuracy" else f"{v:.3f}"

    lines = [
        "| depth \\ length | " + " | ".join(format_length(n) for n in lengths) + " |",
        "| --- |" + " ---: |" * len(lengths),
    ]
    for depth in depths:
        lines.append(f"| {depth:g}% | " + " | ".join(cell(values[n][depth]) for n in lengths) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{cell(np.mean(list(values[n].values())))}**" for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def markdown_tables(result: dict) -> str:
    return (
        "Accuracy (%):\n\n" + markdown_table(result) + "\nAnswer loss (nats per key digit, teacher-forced; "
        "chance ln 10 = 2.30):\n\n" + markdown_table(result, "answer_nll")
    )


def save_heatmap(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result["lengths"], result["depths"]
    grid = np.array([[result["accuracy"][n][d] for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out_dir: str, title: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "passkey.json"),
        "markdown": os.path.join(out_dir, "passkey.md"),
        "heatmap": os.path.join(out_dir, "passkey_heatmap.png"),
    }
    serialisable = dict(
        result,
        **{
            field: {str(n): {f"{d:g}": v for d, v in by_depth.items()} for n, by_depth in result[field].items()}
            for field in ("accuracy", "answer_nll")
        },
    )
    with open(paths["json"], "w") as f:
        json.dump(serialisable, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(f"{title}\n\n{markdown_tables(result)}")
    save_heatmap(result, paths["heatmap"], title)
    return paths


def load_result(out_dir: str) -> dict:
    """A passkey.json written by write_results, with numeric accuracy keys again."""
    with open(os.path.join(out_dir, "passkey.json")) as f:
        result = json.load(f)
    for field in ("accuracy", "answer_nll"):
        result[field] = {n: {d: result[field][str(n)][f"{d:g}"] for d in result["depths"]} for n in result["lengths"]}
    return result


def _learned_scales(state, layer: int, kind: str) -> str:
    scale = state[f"decoder.layers.{layer}.self_attention.core_attention.memory_{kind}_log_scale"].float().exp()
    return f"{kind} {scale.mean():.2f} [{scale.min():.2f}, {scale.max():.2f}]"


def report(
    memory_dir: str,
    ablated_dir: str,
    model_dir: str,
    train_dirs: Sequence[str] = (),
    train_seconds: Optional[float] = None,
    total_seconds: Optional[float] = None,
) -> str:
    """Markdown: setup, per-layer gates, accuracy with and without memory side by side, full tables."""
    from modeling.export import read_export

    with_memory, ablated = load_result(memory_dir), load_result(ablated_dir)
    cfg, state = read_export(model_dir)
    gates = [
        torch.sigmoid(state[f"decoder.layers.{i}.self_attention.core_attention.gate"].float())
        for i in range(cfg.num_layers if cfg.memory else 0)
    ]
    lines = [
        "### Passkey retrieval",
        "",
        f"Model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"segment {cfg.segment_length}, {cfg.update if cfg.memory else 'no'} memory, vocabulary {cfg.vocab_size}; "
        "evaluated with memory "
        f"key scale {with_memory.get('memory_key_scale', 1.0):g} and query scale "
        f"{with_memory.get('memory_query_scale', 1.0):g} (sigma(c k) written, sigma(c q) read; 1 is the paper's)"
        + (", times the learned per-head scales." if cfg.learned_memory_scales else "."),
    ]
    for train_dir in train_dirs:
        steps = training_steps(train_dir) if os.path.exists(os.path.join(train_dir, "metrics.jsonl")) else []
        if steps:
            # Minutes in steps count every resumed part of a run, which one command's wall time does not.
            lines.append(
                f"Training ({os.path.basename(os.path.normpath(train_dir))}): {steps[-1]['step']} steps, "
                f"{steps[-1].get('consumed_tokens', 0):,} tokens, final loss {steps[-1]['loss']:.4f}, "
                f"{sum(row['step_time_s'] for row in steps) / 60:.1f} min in steps."
            )
    if torch.cuda.is_available():
        lines.append(f"Device: {torch.cuda.get_device_name()}.")
    if train_seconds is not None and total_seconds is not None:
        lines.append(
            f"Wall time: {train_seconds / 60:.1f} min data + training + export, {total_seconds / 60:.1f} min in all."
        )
    if gates:
        lines.append(
            "Gates sigmoid(beta), mean [min, max] over heads, per layer: "
            + "; ".join(f"{i}: {g.mean():.3f} [{g.min():.3f}, {g.max():.3f}]" for i, g in enumerate(gates))
            + "."
        )
    if cfg.learned_memory_scales:
        lines.append(
            "Learned memory scales, mean [min, max] over heads, per layer: "
            + "; ".join(
                f"{i}: {_learned_scales(state, i, 'key')}, {_learned_scales(state, i, 'query')}"
                for i in range(cfg.num_layers)
            )
            + "."
        )
    lines += [
        "",
        f"Accuracy (%) over {with_memory['trials']} trials x {len(with_memory['depths'])} depths per length; "
        "'worst depth' is the lowest accuracy at any single depth; chance is 0.001%. Answer loss: nats per "
        "key digit, teacher-forced, mean over depths (chance ln 10 = 2.30).",
        "",
        "| length | segments | with memory: mean | worst depth | answer loss | memory ablated: mean | "
        "worst depth | answer loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in with_memory["lengths"]:
        cells = [format_length(n), str(-(-n // cfg.segment_length))]
        for result in (with_memory, ablated):
            accuracy = list(result["accuracy"][n].values())
            cells += [
                f"{100 * np.mean(accuracy):.1f}",
                f"{100 * min(accuracy):.1f}",
                f"{np.mean(list(result['answer_nll'][n].values())):.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "With memory, by depth:",
        "",
        markdown_tables(with_memory),
        "",
        "Memory ablated (gates forced local), by depth:",
        "",
        markdown_tables(ablated),
    ]
    return "\n".join(lines)


def make_documents(
    n_docs: int,
    min_len: int,
    max_len: int,
    seed: int,
    questions: int = 1,
    header: bool = True,
    distractors: int = 0,
    near: float = 0.0,
) -> List[str]:
    """Training documents of min_len..max_len - 1 bytes (the reader's <eos> makes max_len): a
    passkey prompt of random length, depth and key, then " KEY." answering it. With questions > 1,
    that many - 1 more answered questions sit at random sentence starts after the needle: more of the
    loss on retrieving the key, the one part of a document that needs the memory. Without the header
    a document can be short enough that the memory holds little more than the needle when asked.
    Distractors are other 5-digit numbers (DISTRACTOR sentences, never asked for) at random sentence
    starts anywhere: a memory read that mixes in their values answers wrong digits. In a share `near`
    of the documents (questions > 1) the first extra question starts within NEAR_BYTES of filler after
    the needle (the distractors added after it can lengthen that), in the needle's segment or the
    next: in documents many segments long a question otherwise almost never sits that close, and a
    model trained on them alone stops answering from its own segment."""
    from data_pipeline.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        key = random_key(rng)
        answer, needle = f" {key}.", NEEDLE.format(key=key)
        extra = (questions - 1) * len(QUESTION + answer) + distractors * len(DISTRACTOR.format(number=key))
        length = int(rng.integers(min_len, max_len)) - len(answer) - extra
        prompt = make_prompt(tokenizer, length, float(rng.random()), key, header)
        text = prompt.astype(np.uint8).tobytes().decode("ascii")
        end = len(text) - len(QUESTION)
        starts = [i for i in range(text.index(needle) + len(needle), end) if text[i - 1] == "."] or [end]
        chosen = list(rng.choice(starts, size=questions - 1))
        # Drawn only when asked for, so that documents made without it stay as they were.
        if near and rng.random() < near:
            close = [i for i in starts if i - starts[0] < NEAR_BYTES]
            chosen[0] = close[int(rng.integers(len(close)))]
        for at in sorted(chosen, reverse=True):
            text = text[:at] + QUESTION + answer + text[at:]
        if distractors:
            # Anywhere a sentence ends, but not inside the needle.
            at_needle = text.index(needle)
            inside = range(at_needle + 1, at_needle + len(needle))
            ends = [m.end() for m in re.finditer(r"\.", text) if m.end() not in inside] or [len(text)]
            for at in sorted(rng.choice(ends, size=distractors), reverse=True):
                number = random_key(rng)
                while number == key:
                    number = random_key(rng)
                text = text[:at] + DISTRACTOR.format(number=number) + text[at:]
        docs.append(text + answer)
    return docs


def answer_digit_spans(text: str) -> List[List[int]]:
    """[start, end) of the key's digits in every answer " KEY." that follows a question. Only the
    digits need the memory: the space before them and the period after follow from the question."""
    return [list(m.span(1)) for m in re.finditer(re.escape(QUESTION) + r" (\d+)\.", text)]


def make_data(
    out: str,
    n_docs: int,
    max_len: int,
    min_len: Optional[int],
    seed: int,
    questions: int = 1,
    answer_weight: float = 1.0,
    header: bool = True,
    distractors: int = 0,
    near: float = 0.0,
) -> dict:
    from data_pipeline.make_shards import write_shards

    if questions < 1:
        raise ValueError(f"--questions must be >= 1, got {questions}")
    if not (np.isfinite(answer_weight) and answer_weight >= 0):
        raise ValueError(f"--answer-weight must be a finite number >= 0, got {answer_weight}")
    if distractors < 0:
        raise ValueError(f"--distractors must be >= 0, got {distractors}")
    if not 0 <= near <= 1 or (near and questions < 2):
        raise ValueError(f"--near must be a share between 0 and 1 and needs --questions >= 2, got {near}")
    shortest = (
        len((HEADER if header else "") + NEEDLE.format(key="12345"))
        + questions * len(QUESTION + " 12345.")
        + distractors * len(DISTRACTOR.format(number="12345"))
    )
    min_len = max(max_len // 8, shortest) if min_len is None else min_len
    if not shortest <= min_len < max_len:
        raise ValueError(f"need {shortest} <= --min-len ({min_len}) < --max-len ({max_len})")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "passkey.jsonl")
    with open(jsonl, "w") as f:
        for text in make_documents(n_docs, min_len, max_len, seed, questions, header, distractors, near):
            doc = {"text": text}
            if answer_weight != 1:
                doc["loss_weights"] = [[start, end, answer_weight] for start, end in answer_digit_spans(text)]
            f.write(json.dumps(doc) + "\n")
    return write_shards([jsonl], os.path.join(out, "shards"), "bytes", overwrite=True, progress=False)


def _report_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evals.passkey report",
        description="the with-memory and ablated passkey runs side by side, in markdown",
    )
    ap.add_argument("--memory", required=True, metavar="DIR", help="--out of the run with memory")
    ap.add_argument("--ablated", required=True, metavar="DIR", help="--out of the --ablate-memory run")
    ap.add_argument("--model", required=True, metavar="DIR", help="the exported model both evaluated")
    ap.add_argument(
        "--train-dirs", nargs="*", default=[], metavar="RUN_DIR", help="training run_dirs (steps, loss, minutes)"
    )
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--total-seconds", type=float, default=None)
    ap.add_argument("--out", required=True, metavar="FILE")
    a = ap.parse_args(argv)
    text = report(a.memory, a.ablated, a.model, a.train_dirs, a.train_seconds, a.total_seconds)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


def _make_data_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evals.passkey make-data", description="passkey training documents as byte-level shards"
    )
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--docs", type=int, required=True)
    ap.add_argument("--max-len", type=int, default=8192, help="tokens per document, <eos> included")
    ap.add_argument("--min-len", type=int, default=None, help="default: max-len / 8")
    ap.add_argument("--questions", type=int, default=1, help="answered questions per document (the last at the end)")
    ap.add_argument(
        "--answer-weight",
        type=float,
        default=1.0,
        help="loss weight of every answer's key digits (1: unweighted shards)",
    )
    ap.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        help="leave out the evaluation prompt's header (documents can then be shorter)",
    )
    ap.add_argument(
        "--distractors", type=int, default=0, help="other 5-digit numbers per document, in sentences never asked for"
    )
    ap.add_argument(
        "--near",
        type=float,
        default=0.0,
        help=f"share of documents whose first extra question starts within {NEAR_BYTES} bytes of filler "
        "after the needle (needs --questions >= 2; default 0)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        summary = make_data(
            a.out, a.docs, a.max_len, a.min_len, a.seed, a.questions, a.answer_weight, a.header, a.distractors, a.near
        )
    except ValueError as error:
        ap.error(str(error))
    print(f"wrote {summary['documents']} documents, {summary['tokens']} tokens: {summary['index']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-data"]:
        return _make_data_main(argv[1:])
    if argv[:1] == ["report"]:
        return _report_main(argv[1:])
    from evals.common import ablation, add_model_arguments, load_for_eval

    ap = argparse.ArgumentParser(prog="python -m evals.passkey", description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma-separated (default {DEFAULT_LENGTHS})")
    ap.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in percent")
    ap.add_argument("--trials", type=int, default=10, help="prompts per (length, depth)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts streamed together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="default: <model>/passkey, passkey_ablated or passkey_ablated_L.H_L.H (--ablate-heads)",
    )
    ap.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        help="prompts without the header, as in documents from make-data --no-header",
    )
    a = ap.parse_args(argv)
    try:
        lengths = [parse_length(x) for x in a.lengths.split(",")]
        depths = [float(x) for x in a.depths.split(",")]
    except ValueError as error:
        ap.error(str(error))
    if any(not 0 <= d <= 100 for d in depths):
        ap.error("--depths are percentages in [0, 100]")
    loaded = load_for_eval(a)
    heads = ",".join(f"{layer}:{head}" for layer, head in a.ablate_heads or ())
    name, title = "passkey", f"passkey retrieval, {a.model}"
    if a.ablate_memory:
        name, title = "passkey_ablated", title + " (memory ablated: gates forced local)"
    if heads:
        name = "passkey_ablated_" + heads.replace(":", ".").replace(",", "_")
        title += f" (gates of heads {heads} forced local)"
    if a.memory_key_scale != 1.0 or a.memory_query_scale != 1.0:
        title += f" (memory key scale {a.memory_key_scale:g}, query scale {a.memory_query_scale:g})"
    with ablation(a, loaded.model):
        result = evaluate(
            loaded,
            lengths,
            depths,
            a.trials,
            seed=a.seed,
            batch_size=a.batch_size,
            window_segments=a.window_segments,
            header=a.header,
        )
    result.update(
        model=a.model,
        ablate_memory=a.ablate_memory,
        ablate_heads=[list(h) for h in a.ablate_heads or ()],
        segment_length=loaded.config.segment_length,
        header=a.header,
        memory_key_scale=a.memory_key_scale,
        memory_query_scale=a.memory_query_scale,
    )
    out = a.out or os.path.join(a.model, name)
    paths = write_results(result, out, title)
    print(markdown_tables(result))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['heatmap']} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
