"""Shard writer: text documents in, WebDataset token shards plus an index out (format: shards.py).

    python -m data_pipeline.make_shards INPUT... --output DIR --tokenizer TOK [--shard-size 256MB]
        [--workers N] [--text-field text] [--weights-field loss_weights] [--on-bad error|skip]
        [--max-files N] [--overwrite]
    python -m data_pipeline.make_shards --source python-stdlib --output DIR --tokenizer bytes

INPUT: .txt files (one file, one document), .jsonl / .jsonl.gz (one JSON object a line, the text
under --text-field, optionally per-token loss weights under --weights-field as weighted character
spans: weights.py), .parquet (the --text-field column), directories (searched recursively for
those) and globs; extensions in any letter case. Files of other types that a directory or glob
turns up are left out and counted in the summary. TOK: `bytes` or the path of a HF tokenizer.json.
Documents keep the input order whatever --workers is; workers tokenize, the main process writes.
The set is written under DIR/.partial and moved into DIR only when complete, so a failed run
leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .shards import (
    DOC_OFFSETS_NAME,
    DOC_TOKENS_NAME,
    FORMAT,
    INDEX_NAME,
    TOKEN_EXT,
    VERSION,
    WEIGHTS_EXT,
    DataError,
    dataset_id,
    doc_key,
    shard_name,
    warn_limited,
)
from .tokenizer import load_tokenizer, token_dtype
from .weights import check_spans, token_weights, weight_runs

log = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_CHUNK_BYTES = 4 << 20
_CHUNK_DOCS = 2048
_KINDS = (".jsonl.gz", ".jsonl", ".txt", ".parquet")
_COMPRESSION_EXTS = (".gz", ".bz2", ".xz", ".zst")
STAGING_NAME = ".partial"

# (label, kind, payload): kind "txt" (file bytes), "json" (one line's bytes) or "text" (parquet value)
RawDoc = Tuple[str, str, object]
# (label, token ids or None if bad, token weight runs or None, bad category, message)
Tokenized = Tuple[str, Optional[np.ndarray], Optional[list], str, str]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _kind(path: str) -> Optional[str]:
    lower = path.lower()
    for ext in _KINDS:
        if lower.endswith(ext):
            return ext[1:]
    return None


def _extension(path: str) -> str:
    """The extension a summary reports an ignored file under: `.md`, `.json.gz`, `(none)`."""
    stem, ext = os.path.splitext(os.path.basename(path))
    if ext.lower() in _COMPRESSION_EXTS:
        ext = os.path.splitext(stem)[1] + ext
    return ext or "(none)"


def expand_inputs(inputs: Sequence[str]) -> Tuple[List[str], Dict[str, int]]:
    """Files, directories (recursively) and globs, in a stable order; and the files of other types
    that a directory or glob turned up, counted by extension. A file named outright must be an input."""
    files: List[str] = []
    ignored: Dict[str, int] = collections.Counter()

    def found(path: str) -> None:
        if _kind(path):
            files.append(path)
        else:
            ignored[_extension(path)] += 1

    for inp in inputs:
        if os.path.isdir(inp):
            for root, dirs, names in os.walk(inp):
                dirs.sort()
                for name in sorted(names):
                    found(os.path.join(root, name))
            continue
        if glob.has_magic(inp):
            matches = sorted(glob.glob(inp, recursive=True))
            if not matches:
                raise DataError(f"{inp}: matches no file")
            for match in matches:
                if os.path.isdir(match):
                    sub_files, sub_ignored = expand_inputs([match])
                    files += sub_files
                    ignored.update(sub_ignored)
                else:
                    found(match)
            continue
        if not os.path.isfile(inp):
            raise DataError(f"{inp}: no such file or directory")
        if not _kind(inp):
            raise DataError(f"{inp}: unsupported input (use .txt, .jsonl, .jsonl.gz or .parquet)")
        files.append(inp)
    return files, dict(ignored)


def format_ignored(ignored: Dict[str, int]) -> str:
    by_ext = ", ".join(f"{ext} {n}" for ext, n in sorted(ignored.items()))
    return f"ignored {sum(ignored.values())} files of other types ({by_ext})" if ignored else "ignored no files"


def stdlib_files() -> List[str]:
    """The running interpreter's standard-library .py files, sorted (no site-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py")]
    return out


def _is_text_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _is_text_type(t.value_type)
    return any(
        f(t)
        for f in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_string_view,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_binary_view,
        )
    )


def _parquet_values(path: str, text_field: str) -> Iterator[list]:
    """The text column of a parquet file, a batch of Python values at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {schema.names})")
    column_type = schema.field(text_field).type
    if not _is_text_type(column_type):
        raise DataError(f"{path}: column {text_field!r} holds {column_type}, not text (a string or binary column)")
    batches = pf.iter_batches(batch_size=1024, columns=[text_field])
    row = 0
    while True:
        try:
            batch = next(batches, None)
            values = batch.column(0).to_pylist() if batch is not None else None
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read column {text_field!r} from row {row} (corrupt file?): {e}") from None
        if values is None:
            return
        yield values
        row += len(values)


def _iter_raw(files: Sequence[str], text_field: str) -> Iterator[Tuple[RawDoc, int]]:
    """Raw documents with the input bytes they took."""
    for path in files:
        kind = _kind(path)
        if kind == "parquet":
            row = 0
            for values in _parquet_values(path, text_field):
                for value in values:
                    size = len(value) if isinstance(value, bytes) else len(value.encode("utf-8")) if value else 0
                    yield (f"{path}:row{row}", "text", value), size
                    row += 1
        elif kind in ("jsonl", "jsonl.gz"):
            with (gzip.open if kind == "jsonl.gz" else open)(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield (f"{path}:{lineno}", "json", line), len(line)
        else:
            with open(path, "rb") as f:
                data = f.read()
            yield (path, "txt", data), len(data)


def _chunks(raw: Iterator[Tuple[RawDoc, int]]) -> Iterator[Tuple[List[RawDoc], int]]:
    chunk: List[RawDoc] = []
    size = 0
    for doc, n in raw:
        chunk.append(doc)
        size += n
        if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_DOCS:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def _text_of(kind: str, payload, field: str, weights_field: str) -> Tuple[Optional[str], Optional[list], str, str]:
    """(text, its weighted character spans or None, bad category, message)."""
    spans = None
    if kind == "json":
        try:
            obj = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, None, "not_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            return None, None, "bad_json", f"not valid JSON ({e.msg})"
        if not isinstance(obj, dict) or field not in obj:
            return None, None, "no_text", f"no {field!r} field"
        payload = obj[field]
        if not isinstance(payload, str):
            return None, None, "no_text", f"field {field!r} is not a string"
        if not payload.isascii():
            # JSON's \ud83d escapes decode to a lone surrogate, a string that has no UTF-8 encoding.
            try:
                payload.encode("utf-8")
            except UnicodeEncodeError as e:
                return (
                    None,
                    None,
                    "lone_surrogate",
                    f"field {field!r} holds a lone surrogate U+{ord(payload[e.start]):04X} at character {e.start}",
                )
        if obj.get(weights_field) is not None:
            try:
                spans = check_spans(obj[weights_field], len(payload), "character")
            except ValueError as e:
                return None, None, "bad_weights", f"field {weights_field!r}: {e}"
    elif payload is None:
        return None, None, "no_text", f"{field!r} is null"
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, None, "not_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})"
    if not payload:
        return None, None, "empty", "empty document"
    return payload, spans or None, "", ""


_WORKER_TOKENIZER = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    # Each worker process is one core already; tokenizers' own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _tokenize(chunk: List[RawDoc], field: str, weights_field: str, tok=None) -> List[Tokenized]:
    tok = tok or _WORKER_TOKENIZER
    out: List[Tokenized] = []
    plain, weighted = [], []  # (position in out, text[, spans])
    for label, kind, payload in chunk:
        text, spans, cat, msg = _text_of(kind, payload, field, weights_field)
        if spans:
            weighted.append((len(out), text, spans))
        elif text is not None:
            plain.append((len(out), text))
        out.append((label, None, None, cat, msg))
    encoded = [(j, ids, None) for (j, _), ids in zip(plain, tok.encode_batch([t for _, t in plain]))]
    # Only weighted documents need the tokens' character offsets.
    for (j, text, spans), (ids, offsets) in zip(weighted, tok.encode_with_offsets([t for _, t, _ in weighted])):
        encoded.append((j, ids, weight_runs(token_weights(spans, offsets, len(text))) or None))
    for j, ids, runs in encoded:
        out[j] = (out[j][0], ids, runs, "", "") if len(ids) else (out[j][0], None, None, "empty", "no tokens")
    return out


def tar_member(name: str, data: bytes) -> bytes:
    """One POSIX ustar member: header, data, zero padding to 512 bytes. Python's tarfile (which
    wds.TarWriter uses) spends 150-300 us on a member, and the one writing process would cap the
    writer at a few MB/s of short documents whatever --workers is. mtime 0 keeps shards
    byte-for-byte reproducible."""
    raw = name.encode()
    if len(raw) > 100 or len(data) >= 8 << 30:
        raise ValueError(f"{name}: name or size out of ustar range")
    h = bytearray(512)
    h[0 : len(raw)] = raw
    h[100:108] = b"0000444\0"  # mode
    h[108:124] = b"0000000\0" * 2  # uid, gid
    h[124:136] = b"%011o\0" % len(data)
    h[136:148] = b"%011o\0" % 0  # mtime
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[156:157] = b"0"  # a regular file
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + bytes(-len(data) % 512)


class _ShardWriter:
    def __init__(self, out_dir: str, dtype: np.dtype, max_bytes: int):
        self.out_dir, self.dtype, self.max_bytes = out_dir, dtype.newbyteorder("<"), max_bytes
        self.ext = TOKEN_EXT[dtype.name]
        self.shards: List[dict] = []
        self.doc_tokens: List[int] = []
        self.doc_offsets: List[int] = []
        self.weighted_documents = 0
        self._file = None

    def add(self, ids: np.ndarray, label: str, weight_runs: Optional[list]) -> None:
        meta = json.dumps({"source": label, "n_tokens": len(ids)}).encode()
        tokens = ids.astype(self.dtype, copy=False).tobytes()
        weights = json.dumps(weight_runs).encode() if weight_runs else b""
        size = sum(512 + n + (-n % 512) for n in (len(meta), len(tokens)))
        size += 512 + len(weights) + (-len(weights) % 512) if weights else 0
        cur = self.shards[-1] if self.shards else None
        if cur is None or (cur["n_documents"] and cur["n_bytes"] + size > self.max_bytes):
            self._roll()
            cur = self.shards[-1]
        key = doc_key(cur["n_documents"])
        self.doc_offsets.append(cur["n_bytes"])
        self._file.write(tar_member(f"{key}.json", meta))
        self._file.write(tar_member(f"{key}.{self.ext}", tokens))
        if weights:
            self._file.write(tar_member(f"{key}.{WEIGHTS_EXT}", weights))
            self.weighted_documents += 1
        cur["n_documents"] += 1
        cur["n_tokens"] += len(ids)
        cur["n_bytes"] += size
        self.doc_tokens.append(len(ids))

    def _roll(self) -> None:
        self.close()
        name = shard_name(len(self.shards))
        self.shards.append(
            {"name": name, "n_documents": 0, "n_tokens": 0, "n_bytes": 0, "first_document": len(self.doc_tokens)}
        )
        self._file = open(os.path.join(self.out_dir, name), "wb")

    def close(self) -> None:
        if self._file is not None:
            self._file.write(bytes(1024))  # end of archive: two zero blocks
            self._file.close()
            self._file = None
            self.shards[-1]["n_bytes"] += 1024


def _shard_set_files(directory: str) -> List[str]:
    return [
        n
        for n in os.listdir(directory)
        if n in (INDEX_NAME, DOC_TOKENS_NAME, DOC_OFFSETS_NAME) or re.fullmatch(r"shard-\d+\.tar", n)
    ]


def _prepare_output(out: str, overwrite: bool) -> Tuple[str, bool]:
    """An empty staging directory inside `out`, and whether `out` was created for this run. A staging
    directory left by a killed run is removed: it never holds a complete set."""
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    old = _shard_set_files(out)
    if old and not overwrite:
        raise DataError(f"{out} already holds a shard set ({len(old)} files); pass --overwrite to replace it")
    staging = os.path.join(out, STAGING_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    return staging, created


def _publish(staging: str, out: str) -> None:
    """Move the complete set from `staging` into `out`, replacing an old set there. The old index
    goes first and the new one comes last, so an interrupted move never leaves a set that reads as
    complete but mixes old and new files."""
    old = set(_shard_set_files(out))
    new = _shard_set_files(staging)
    if INDEX_NAME in old:
        os.remove(os.path.join(out, INDEX_NAME))
    for name in sorted(old - set(new) - {INDEX_NAME}):
        os.remove(os.path.join(out, name))
    for name in sorted(new, key=lambda n: n == INDEX_NAME):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)


def _tokenized(
    chunks: Iterator[Tuple[List[RawDoc], int]], tokenizer: str, tok, workers: int, field: str, weights_field: str
):
    if workers <= 1:
        for chunk, n in chunks:
            yield _tokenize(chunk, field, weights_field, tok), n
        return
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer,)) as pool:
        # A bounded number of chunks in flight keeps memory flat and the output in input order.
        pending: collections.deque = collections.deque()
        for chunk, n in chunks:
            pending.append((pool.apply_async(_tokenize, (chunk, field, weights_field)), n))
            if len(pending) >= 2 * workers:
                res, m = pending.popleft()
                yield res.get(), m
        while pending:
            res, m = pending.popleft()
            yield res.get(), m


def write_shards(
    inputs: Sequence[str],
    output: str,
    tokenizer: str = "bytes",
    *,
    shard_size="256MB",
    workers: int = 1,
    text_field: str = "text",
    weights_field: str = "loss_weights",
    on_bad: str = "error",
    overwrite: bool = False,
    progress: bool = True,
    source: Optional[str] = None,
    max_files: Optional[int] = None,
) -> dict:
    """Write the shard set; returns a summary (index path, counts, throughput, skipped by reason,
    ignored files by extension). on_bad: "error" raises on the first bad document (naming file and
    line/row), "skip" counts it. weights_field: the .jsonl field of a document's weighted character
    spans (weights.py). The set is written into OUTPUT/.partial and moved into OUTPUT only when
    complete: a run that fails leaves OUTPUT as it was (an old set stays, even with overwrite)."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    if source not in (None, "python-stdlib"):
        raise ValueError(f"unknown built-in source {source!r} (known: python-stdlib)")
    tok = load_tokenizer(tokenizer)
    files, ignored = expand_inputs(inputs) if inputs else ([], {})
    files = (stdlib_files() if source else []) + files
    files = files[:max_files] if max_files is not None else files
    if not files:
        raise DataError(f"no input files ({format_ignored(ignored)})")
    staging, created = _prepare_output(output, overwrite)
    try:
        summary = _write_set(
            files,
            staging,
            tok,
            tokenizer,
            shard_size=shard_size,
            workers=workers,
            text_field=text_field,
            weights_field=weights_field,
            on_bad=on_bad,
            progress=progress,
            created_by={
                "inputs": list(inputs),
                "source": source,
                "text_field": text_field,
                "n_files": len(files),
                **({"ignored": ignored} if ignored else {}),
            },
        )
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(output):
            os.rmdir(output)
        raise
    return {"index": os.path.join(output, INDEX_NAME), "files": len(files), "ignored": ignored, **summary}


def _write_set(
    files: Sequence[str],
    out_dir: str,
    tok,
    tokenizer: str,
    *,
    shard_size,
    workers: int,
    text_field: str,
    weights_field: str,
    on_bad: str,
    progress: bool,
    created_by: dict,
) -> dict:
    """Shards, document arrays and index of `files` into `out_dir`; the summary's counts and throughput."""
    dtype = token_dtype(tok.vocab_size)
    writer = _ShardWriter(out_dir, dtype, parse_size(shard_size))
    skipped: Dict[str, int] = collections.Counter()
    total = sum(os.path.getsize(f) for f in files) if all(_kind(f) in ("txt", "jsonl") for f in files) else None
    from tqdm import tqdm

    t0 = time.perf_counter()
    in_bytes = 0
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for results, n in _tokenized(
                _chunks(_iter_raw(files, text_field)), tokenizer, tok, workers, text_field, weights_field
            ):
                for label, ids, runs, cat, msg in results:
                    if ids is None:
                        if on_bad == "error":
                            raise DataError(f"{label}: {msg} (pass --on-bad skip to skip and count such documents)")
                        skipped[cat] += 1
                        warn_limited(log, skipped[cat], f"skipping {label}: {msg}")
                    else:
                        writer.add(ids, label, runs)
                in_bytes += n
                bar.update(n)
    finally:
        writer.close()
    if not writer.doc_tokens:
        raise DataError(f"no documents written (skipped: {dict(skipped)})")
    seconds = time.perf_counter() - t0
    doc_tokens = np.asarray(writer.doc_tokens, dtype=np.int64)
    np.save(os.path.join(out_dir, DOC_TOKENS_NAME), doc_tokens)
    np.save(os.path.join(out_dir, DOC_OFFSETS_NAME), np.asarray(writer.doc_offsets, dtype=np.int64))
    spec = tok.spec()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": spec,
        "dtype": dtype.name,
        "dataset_id": dataset_id(
            [s["name"] for s in writer.shards],
            [s["n_documents"] for s in writer.shards],
            doc_tokens,
            {k: v for k, v in spec.items() if k != "path"},
        ),
        "n_documents": len(doc_tokens),
        "n_tokens": int(doc_tokens.sum()),
        "doc_tokens": DOC_TOKENS_NAME,
        "doc_offsets": DOC_OFFSETS_NAME,
        "shards": writer.shards,
        "created_by": {**created_by, "skipped": dict(skipped)},
    }
    if writer.weighted_documents:
        # Only then: a set without weights keeps the index it always had.
        index["weighted_documents"] = writer.weighted_documents
        index["created_by"]["weights_field"] = weights_field
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=1)
    out_bytes = sum(s["n_bytes"] for s in writer.shards)
    return {
        "documents": len(doc_tokens),
        "tokens": index["n_tokens"],
        "shards": len(writer.shards),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "seconds": seconds,
        "input_mb_per_s": in_bytes / 1e6 / seconds,
        "tokens_per_s": index["n_tokens"] / seconds,
        "weighted_documents": writer.weighted_documents,
        "skipped": dict(skipped),
    }


def build_stdlib_shards(
    output_dir: str,
    tokenizer: str = "bytes",
    max_files: Optional[int] = None,
    shard_size="8MB",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Shards of this interpreter's standard library (no download). The few empty and non-UTF-8
    files are skipped and counted in the index. Returns the index path."""
    return write_shards(
        [],
        output_dir,
        tokenizer,
        shard_size=shard_size,
        workers=workers,
        on_bad="skip",
        overwrite=overwrite,
        progress=progress,
        source="python-stdlib",
        max_files=max_files,
    )["index"]


def format_summary(s: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
    return (
        f"wrote {s['documents']} documents, {s['tokens']} tokens from {s['files']} files into {s['shards']} "
        f"shards ({s['output_bytes'] / 1e6:.1f} MB) in {s['seconds']:.1f} s: {s['input_mb_per_s']:.1f} MB/s of "
        f"text, {s['tokens_per_s'] / 1e6:.2f} M tokens/s; skipped: {skipped}; {format_ignored(s['ignored'])}\n"
        f"index: {s['index']}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.make_shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", metavar="INPUT")
    ap.add_argument("--output", required=True, metavar="DIR")
    ap.add_argument("--tokenizer", required=True, metavar="TOK", help="'bytes' or a tokenizer.json")
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--text-field", default="text")
    ap.add_argument(
        "--weights-field",
        default="loss_weights",
        help="optional .jsonl field: [[start_char, end_char, weight], ...] per-token loss weights",
    )
    ap.add_argument("--on-bad", choices=("error", "skip"), default="error")
    ap.add_argument("--source", choices=("python-stdlib",))
    ap.add_argument("--max-files", type=int)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not a.inputs and not a.source:
        ap.error("give INPUT files or --source")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        s = write_shards(
            a.inputs,
            a.output,
            a.tokenizer,
            shard_size=a.shard_size,
            workers=a.workers,
            text_field=a.text_field,
            weights_field=a.weights_field,
            on_bad=a.on_bad,
            overwrite=a.overwrite,
            progress=not a.no_progress,
            source=a.source,
            max_files=a.max_files,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(s), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
