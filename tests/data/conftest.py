"""Session fixtures: small shard sets written once (bytes tokenizer), with reference token lists."""

from __future__ import annotations

import pytest

from data_pipeline.make_shards import write_shards
from tests.data.helpers import byte_ids, make_texts, write_jsonl


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """120 documents in 15 shards (bytes tokenizer), and their reference token lists."""
    d = tmp_path_factory.mktemp("corpus")
    texts = make_texts(120, seed=0)
    src = write_jsonl(str(d / "docs.jsonl"), texts)
    out = str(d / "shards")
    write_shards([src], out, "bytes", shard_size="32KB", progress=False)
    return {"dir": out, "texts": texts, "ref": [byte_ids(t) for t in texts]}


@pytest.fixture(scope="session")
def corpus_b(tmp_path_factory):
    """A second, smaller source for mixing: 40 documents in ~4 shards."""
    d = tmp_path_factory.mktemp("corpus_b")
    texts = ["B" + t for t in make_texts(40, seed=1)]
    src = write_jsonl(str(d / "b.jsonl"), texts)
    out = str(d / "shards")
    write_shards([src], out, "bytes", shard_size="16KB", progress=False)
    return {"dir": out, "texts": texts, "ref": [byte_ids(t) for t in texts]}
