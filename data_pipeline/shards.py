"""The shard format, its index, and reading documents from one shard through webdataset.

A shard set is a directory holding
  shard-000000.tar ...   WebDataset tars; sample `KKKKKKKKK` (the document's index within its shard,
                         nine digits) has `KKKKKKKKK.tokens.u16` (or `.tokens.u32`): the token ids as
                         raw little-endian integers, and `KKKKKKKKK.json`: {"source": ..., "n_tokens": n};
                         a document with loss weights also has `KKKKKKKKK.weights.json`: the runs of
                         tokens whose weight is not 1, [[start, end, weight], ...] (weights.py)
  doc_tokens.npy         int64, the token count of every document, shard after shard
  doc_offsets.npy        int64, where each document's first tar member starts in its shard, so a
                         reader of a local shard seeks to its position instead of reading up to it
  index.json             format, tokenizer (kind, vocab_size, pad_id, eos_id), dtype, dataset_id,
                         per shard: name, n_documents, n_tokens, n_bytes, first_document; and
                         weighted_documents (their count) where there are any
The index is written last, so a set without one is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import braceexpand
import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from .weights import check_spans, expand_runs

log = logging.getLogger(__name__)

FORMAT = "infinitron-shards"
VERSION = 1
INDEX_NAME = "index.json"
DOC_TOKENS_NAME = "doc_tokens.npy"
DOC_OFFSETS_NAME = "doc_offsets.npy"
TOKEN_EXT = {"uint16": "tokens.u16", "uint32": "tokens.u32"}
WEIGHTS_EXT = "weights.json"
_KEY_DIGITS = 9


class DataError(RuntimeError):
    """Bad or inconsistent data; the message names the file or shard and, where known, the document."""


def doc_key(index_in_shard: int) -> str:
    return f"{index_in_shard:0{_KEY_DIGITS}d}"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def dataset_id(names: List[str], n_docs: List[int], doc_tokens: np.ndarray, tokenizer: dict) -> str:
    """Content identity of a shard set, so that a resume notices a rebuilt or different dataset."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([names, n_docs, tokenizer], sort_keys=True).encode())
    h.update(np.ascontiguousarray(doc_tokens, dtype=np.int64).tobytes())
    return h.hexdigest()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def held_out_unit(name: str, n_docs: int) -> np.ndarray:
    """A uniform number in [0, 1) per document of shard `name`, fixed by the data alone, that
    decides the validation split (documents below valid_fraction are held out)."""
    salt = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        z = _splitmix64(np.arange(n_docs, dtype=np.uint64) ^ np.uint64(salt))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


@dataclass
class ShardSet:
    """A loaded index with the URL of every shard."""

    index_path: str
    urls: List[str]
    names: List[str]
    n_docs: np.ndarray  # per shard
    first_doc: np.ndarray  # per shard, into doc_tokens
    doc_tokens: np.ndarray  # per document, all shards
    doc_offsets: np.ndarray  # per document: byte offset in its shard
    tokenizer: dict
    dtype: str
    dataset_id: str
    weighted_documents: int

    @property
    def token_ext(self) -> str:
        return TOKEN_EXT[self.dtype]

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def lengths(self, shard: int) -> np.ndarray:
        f = int(self.first_doc[shard])
        return self.doc_tokens[f : f + int(self.n_docs[shard])]

    def offset(self, shard: int, doc: int) -> int:
        return int(self.doc_offsets[int(self.first_doc[shard]) + doc])

    def missing_local_shards(self) -> List[str]:
        return [u for u in self.urls if _is_local(u) and not os.path.exists(_local_path(u))]


def read_index(index_path: str) -> dict:
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"no shard index at {index_path} (write one with python -m data_pipeline.make_shards)"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{index_path}: not a valid index ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{index_path}: not a {FORMAT} v{VERSION} index")
    return index


def open_shard_set(path: str, index: Optional[str] = None) -> ShardSet:
    """`path`: a shard directory, its index.json, or (with `index`) a shard pattern or URL list that
    webdataset understands (`dir/shard-{000000..000009}.tar`, `pipe:cat dir/shard-000000.tar`, ...).
    A pattern must expand to the index's shards in index order."""
    if index is None:
        if path.endswith(".json"):
            index = path
        elif os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
        else:
            raise DataError(
                f"source {path!r} is neither a shard directory nor an index.json; "
                "for a shard pattern or pipe: URL also give the index"
            )
        path = ""
    meta = read_index(index)
    root = os.path.dirname(os.path.abspath(index))
    shards = meta["shards"]
    names = [s["name"] for s in shards]
    if path:
        urls = list(braceexpand.braceexpand(path))
        if len(urls) != len(names):
            raise DataError(f"{path!r} expands to {len(urls)} shards but {index} lists {len(names)}")
        for u, n in zip(urls, names):
            if n not in u:
                raise DataError(f"shard URL {u!r} does not match the index's shard {n!r} (order must match)")
    else:
        urls = [os.path.join(root, n) for n in names]
    n_docs = np.array([s["n_documents"] for s in shards], dtype=np.int64)
    first = np.array([s["first_document"] for s in shards], dtype=np.int64)
    arrays = []
    for key in ("doc_tokens", "doc_offsets"):
        a = np.load(os.path.join(root, meta[key]), mmap_mode="r")
        if a.shape != (int(n_docs.sum()),):
            raise DataError(f"{index}: {meta[key]} has {a.shape[0]} entries, the shards hold {n_docs.sum()} documents")
        arrays.append(a)
    ss = ShardSet(
        index,
        urls,
        names,
        n_docs,
        first,
        *arrays,
        meta["tokenizer"],
        meta["dtype"],
        meta["dataset_id"],
        int(meta.get("weighted_documents", 0)),
    )
    for k, s in enumerate(shards):
        if int(ss.lengths(k).sum()) != s["n_tokens"]:
            raise DataError(f"{index}: shard {s['name']} n_tokens disagrees with {meta['doc_tokens']}")
    return ss


def _decode_tokens(key: str, data: bytes):
    """webdataset decoder handler for the token files (the json goes to its default handler)."""
    if key.endswith(".tokens.u16"):
        return np.frombuffer(data, dtype="<u2")
    if key.endswith(".tokens.u32"):
        return np.frombuffer(data, dtype="<u4")
    return None


_WARN_LIMIT = 10


def warn_limited(logger: logging.Logger, nth: int, msg: str) -> None:
    """Log the first few of a kind; the counts carry the rest."""
    if nth <= _WARN_LIMIT:
        logger.warning(msg + (" (further ones of this kind are only counted)" if nth == _WARN_LIMIT else ""))


class BadSamples:
    """Applies DataConfig.on_bad_sample: raise a DataError, or count the sample (by reason) and
    go on. Counts are plain ints so they travel in the loader's state."""

    def __init__(self, mode: str, counts: Optional[dict] = None):
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', not {mode!r}")
        self.mode = mode
        self.counts = Counter(counts or {})

    def __call__(self, where: str, reason: str, category: str) -> None:
        if self.mode == "error":
            raise DataError(f"{where}: {reason} (set on_bad_sample='skip' to skip and count such samples)")
        self.counts[category] += 1
        warn_limited(log, self.counts[category], f"skipping {where}: {reason}")


def _open_at(data, offset: int, opened: list, handler):
    """webdataset stage: open each url's stream, a local file positioned at `offset`."""
    for sample in data:
        url = sample["url"]
        try:
            if offset and _is_local(url):
                stream = open(_local_path(url), "rb")
                stream.seek(offset)
            else:
                stream = wds.gopen(url)
        except Exception as exn:
            if handler(exn):
                continue
            break
        opened.append(stream)
        yield {**sample, "stream": stream}


def _token_weights(data: bytes, n_tokens: int) -> np.ndarray:
    """A weights member's runs as one float32 weight per token; ValueError when malformed."""
    try:
        runs = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    return expand_runs(check_spans(runs, n_tokens, "token"), n_tokens)


def read_documents(
    ss: ShardSet, shard: int, wanted: np.ndarray, start: int, bad: BadSamples
) -> Iterator[Tuple[int, np.ndarray, Optional[np.ndarray]]]:
    """Yield (position in `wanted`, token ids, float32 weight per token or None when the document
    has none) for documents wanted[start:] of one shard, in order.

    `wanted` is a sorted array of document indices within the shard. webdataset reads and decodes
    the tar, from the first wanted document's offset where the shard is a local file; files of
    unwanted documents are skipped unread. Every wanted document must arrive, complete and
    consistent with the index, or it is reported to `bad` (error or skip-and-count): a tar that
    ends early at a member boundary looks well-formed, so counting is the only guard."""
    url = ss.urls[shard]
    n = int(ss.n_docs[shard])
    if start >= len(wanted):
        return
    offset = ss.offset(shard, int(wanted[start]))
    want = np.zeros(n, dtype=bool)
    want[wanted[start:]] = True
    # webdataset ends a sample when the next selected file shows up: selecting the document after
    # the last wanted one stops the read there instead of at the end of the shard.
    want[min(int(wanted[-1]) + 1, n - 1)] = True
    lengths = ss.lengths(shard)
    vocab = ss.vocab_size
    ext = ss.token_ext
    last_error: List[str] = []
    pos = start

    def select(fname: str) -> bool:
        m = re.match(r"(?:.*/)?(\d+)\.", fname)
        return m is not None and int(m.group(1)) < n and bool(want[int(m.group(1))])

    def on_exception(exn: Exception) -> bool:
        msg = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        if pos > start:
            after = f" after document {doc_key(int(wanted[pos - 1]))}"
        else:
            after = f" from byte {offset} (does the index belong to this shard?)" if offset else ""
        if bad.mode == "error":
            raise DataError(f"shard {url}: cannot read{after}: {msg}") from exn
        last_error.append(msg)
        return True

    def where(i: int) -> str:
        return f"shard {url} document {doc_key(i)}"

    if _is_local(url) and os.path.exists(_local_path(url)) and offset >= os.path.getsize(_local_path(url)):
        last_error.append(f"the shard ends at byte {os.path.getsize(_local_path(url))}, before this document")
    opened: list = []
    ds = wds.DataPipeline(
        lambda: iter([{"url": url}]),
        wds.pipelinefilter(_open_at)(offset, opened, on_exception),
        wds.pipelinefilter(tar_file_expander)(handler=on_exception, select_files=select),
        wds.pipelinefilter(group_by_keys)(handler=on_exception),
        # Only the token ids need decoding; the metadata is for people.
        wds.decode(_decode_tokens, only=[ext], handler=on_exception),
    )
    it = iter(ds) if not last_error else iter(())
    try:
        for sample in it:
            i = int(sample["__key__"].rsplit("/", 1)[-1])
            while pos < len(wanted) and wanted[pos] < i:
                why = f" ({last_error[-1]})" if last_error else ""
                bad(where(int(wanted[pos])), f"missing from the shard{why}", "unreadable")
                pos += 1
            if pos == len(wanted):
                return
            if wanted[pos] != i:
                bad(where(i), "duplicate or out-of-order key", "bad_key")
                continue
            tokens = sample.get(ext)
            p, pos = pos, pos + 1
            if not isinstance(tokens, np.ndarray) and last_error:
                # The read error came while this sample was being put together.
                bad(where(i), f"is incomplete ({last_error[-1]})", "unreadable")
            elif not isinstance(tokens, np.ndarray):
                have = sorted(k for k in sample if not k.startswith("__"))
                bad(where(i), f"has no token ids (expected a {ext} file, found {have})", "no_tokens")
            elif len(tokens) == 0:
                bad(where(i), "is an empty document", "empty")
            elif len(tokens) != lengths[i]:
                bad(where(i), f"has {len(tokens)} tokens, the index says {lengths[i]}", "length_mismatch")
            elif int(tokens.max()) >= vocab:
                bad(where(i), f"has token id {int(tokens.max())} >= vocab size {vocab}", "bad_token_id")
            else:
                try:
                    weights = _token_weights(sample[WEIGHTS_EXT], len(tokens)) if WEIGHTS_EXT in sample else None
                except ValueError as e:
                    bad(where(i), f"has bad loss weights ({WEIGHTS_EXT}: {e})", "bad_weights")
                    continue
                yield p, tokens, weights
                if pos == len(wanted):
                    return
        why = last_error[-1] if last_error else "shard ended early (truncated?)"
        for p in range(pos, len(wanted)):
            bad(where(int(wanted[p])), f"missing from the shard ({why})", "unreadable")
    finally:
        close: Callable[[], None] = getattr(it, "close", lambda: None)
        close()
        for stream in opened:
            stream.close()
