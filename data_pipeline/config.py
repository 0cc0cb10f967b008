"""Reader configuration: plain dataclasses, usable as OmegaConf structured configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class SourceConfig:
    # A shard directory (holding index.json), an index.json, or a webdataset shard pattern / URL
    # list (braces, pipe:) - the latter together with `index`.
    path: str = ""
    # Share of this source in each lane's tokens (normalised over the sources).
    weight: float = 1.0
    index: Optional[str] = None


@dataclass
class RunDataConfig:
    """What a training run configures about its data: everything but the window's segment length and the
    validation cap, which the run takes from its model and validation sections (``DataConfig`` adds them)."""

    sources: List[SourceConfig] = field(default_factory=list)
    # Validation data: these sources if given, else the documents of `sources` whose fixed,
    # data-derived hash falls below valid_fraction (they are then left out of training).
    valid_sources: List[SourceConfig] = field(default_factory=list)
    valid_fraction: float = 0.0

    # Lanes of the global batch; the data-parallel size must divide it.
    global_lanes: int = 8
    n_segments: int = 4
    seed: int = 1234

    # DataLoader worker processes per rank (0: produce batches in the calling process).
    num_workers: int = 2
    prefetch: int = 2
    # A worker that delivers nothing for this long is an error, not a hang.
    worker_timeout_s: float = 600.0

    # Documents are shuffled in consecutive blocks of this many documents (1: no shuffling).
    shuffle_buffer: int = 32
    # Documents with fewer / more tokens are left out (0 for max: no limit).
    min_doc_tokens: int = 1
    max_doc_tokens: int = 0
    # Append the tokenizer's <eos> to every document, so the model learns where one ends.
    append_eos: bool = True
    # The model's vocabulary; 0 takes the tokenizer's. It must cover the tokenizer's ids.
    vocab_size: int = 0
    # "error": raise on a bad sample or shard, naming it; "skip": skip it and count it.
    on_bad_sample: str = "error"


@dataclass
class DataConfig(RunDataConfig):
    """The reader's whole configuration."""

    # Tokens per segment; a window is n_segments of them.
    segment_length: int = 2048
    # Batches per validation pass; 0 = one full pass over the validation documents.
    valid_batches: int = 0


def validate(cfg: DataConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"DataConfig: {msg}")

    need(len(cfg.sources) > 0, "sources is empty")
    need(all(s.path for s in list(cfg.sources) + list(cfg.valid_sources)), "every source needs a path")
    need(all(s.weight > 0 for s in cfg.sources), "source weights must be > 0")
    need(cfg.global_lanes > 0, "global_lanes must be > 0")
    need(cfg.seed >= 0, "seed must be >= 0")
    need(cfg.segment_length > 0 and cfg.n_segments > 0, "segment_length and n_segments must be > 0")
    need(cfg.num_workers >= 0 and cfg.prefetch > 0, "num_workers must be >= 0 and prefetch > 0")
    need(cfg.shuffle_buffer >= 1, "shuffle_buffer must be >= 1")
    need(cfg.min_doc_tokens >= 0 and cfg.max_doc_tokens >= 0, "document length limits must be >= 0")
    need(cfg.max_doc_tokens == 0 or cfg.max_doc_tokens >= cfg.min_doc_tokens, "max_doc_tokens < min_doc_tokens")
    need(0.0 <= cfg.valid_fraction < 1.0, "valid_fraction must be in [0, 1)")
    need(cfg.valid_batches >= 0, "valid_batches must be >= 0")
    need(cfg.on_bad_sample in ("error", "skip"), "on_bad_sample must be 'error' or 'skip'")
