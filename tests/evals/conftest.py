import contextlib
import io
import json
import os

import pytest

from tests.distributed import run_distributed
from tests.evals.helpers import (
    ABLATED_HEADS,
    KEY_SCALE,
    PASSKEY_ARGS,
    PPL_BUCKETS,
    QUERY_SCALE,
    SEGMENT,
    SEGMENT_BINS,
    TEXTS,
)


def cli_worker(rank, world, root):
    """A tiny exported model with learned memory scales evaluated by the passkey (with and without memory)
    and perplexity CLIs."""
    from data_pipeline.make_shards import write_shards
    from evals import passkey, perplexity
    from modeling.export import export_model
    from tests.evals.models import tiny_config, tiny_model
    from training.distributed import init_single_process

    init_single_process()
    cfg = tiny_config(segment_length=SEGMENT, update="delta", learned_memory_scales=True)
    export = os.path.join(root, "export")
    export_model(tiny_model(cfg, seed=4), cfg, export)
    assert passkey.main(["--model", export, "--out", os.path.join(root, "passkey")] + PASSKEY_ARGS) == 0
    assert (
        passkey.main(["--model", export, "--out", os.path.join(root, "ablated"), "--ablate-memory"] + PASSKEY_ARGS) == 0
    )
    assert (
        passkey.main(["--model", export, "--out", os.path.join(root, "no_header"), "--no-header"] + PASSKEY_ARGS) == 0
    )
    assert (
        passkey.main(
            [
                "--model",
                export,
                "--out",
                os.path.join(root, "heads"),
                "--ablate-heads",
                ",".join(f"{layer}:{head}" for layer, head in ABLATED_HEADS),
            ]
            + PASSKEY_ARGS
        )
        == 0
    )
    assert (
        passkey.main(
            [
                "--model",
                export,
                "--out",
                os.path.join(root, "key_scale"),
                "--memory-key-scale",
                str(KEY_SCALE),
                "--memory-query-scale",
                str(QUERY_SCALE),
            ]
            + PASSKEY_ARGS
        )
        == 0
    )
    usage = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(usage):
        passkey.main(
            ["--model", export, "--out", os.path.join(root, "refused"), "--memory-key-scale", "0"] + PASSKEY_ARGS
        )
    assert "argument --memory-key-scale: must be > 0, got 0" in usage.getvalue()
    with pytest.raises(SystemExit, match="no head 2:0 to ablate: the model has layers 0-1 of heads 0-3"):
        passkey.main(
            ["--model", export, "--out", os.path.join(root, "refused"), "--ablate-heads", "0:1,2:0"] + PASSKEY_ARGS
        )
    usage = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(usage):
        passkey.main(
            ["--model", export, "--out", os.path.join(root, "refused"), "--ablate-heads", "0-1"] + PASSKEY_ARGS
        )
    assert "argument --ablate-heads: '0-1' is not a layer:head pair such as 2:4" in usage.getvalue()
    for run, flags in (("bf16", []), ("half", ["--half-memory-products"])):
        assert (
            passkey.main(
                ["--model", export, "--out", os.path.join(root, run), "--dtype", "bf16"] + flags + PASSKEY_ARGS
            )
            == 0
        )
    with pytest.raises(SystemExit, match="--half-memory-products needs bf16"):
        passkey.main(
            ["--model", export, "--out", os.path.join(root, "refused"), "--half-memory-products"] + PASSKEY_ARGS
        )
    texts = []
    for i, text in enumerate(TEXTS):
        texts.append(os.path.join(root, f"doc{i}.txt"))
        with open(texts[-1], "w") as f:
            f.write(text)
    with open(os.path.join(root, "docs.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    write_shards([os.path.join(root, "docs.jsonl")], os.path.join(root, "shards"), "bytes", progress=False)
    common = ["--model", export, "--buckets", PPL_BUCKETS, "--window-segments", "1"]
    assert (
        perplexity.main(
            common + ["--segment-bins", str(SEGMENT_BINS), "--text"] + texts + ["--out", os.path.join(root, "ppl_text")]
        )
        == 0
    )
    assert (
        perplexity.main(common + ["--shards", os.path.join(root, "shards"), "--out", os.path.join(root, "ppl_shards")])
        == 0
    )
    no_memory = os.path.join(root, "export_no_memory")
    cfg = tiny_config(segment_length=SEGMENT, memory=False)
    export_model(tiny_model(cfg, seed=4), cfg, no_memory)
    assert (
        perplexity.main(
            ["--model", no_memory, "--buckets", PPL_BUCKETS, "--text"]
            + texts
            + ["--out", os.path.join(root, "ppl_no_memory")]
        )
        == 0
    )
    with pytest.raises(SystemExit, match="--ablate-memory: the model has no memory to ablate"):
        passkey.main(["--model", no_memory, "--out", os.path.join(root, "refused"), "--ablate-memory"] + PASSKEY_ARGS)
    return root


@pytest.fixture(scope="session")
def eval_runs(tmp_path_factory):
    """The directory holding export/, passkey/, ablated/, no_header/, heads/ (ABLATED_HEADS forced local),
    key_scale/ (--memory-key-scale KEY_SCALE --memory-query-scale QUERY_SCALE),
    bf16/, half/ (bf16 memory products too), ppl_text/, ppl_shards/; export_no_memory/ (a model
    without the memory) and its ppl_no_memory/."""
    return run_distributed(cli_worker, 1, str(tmp_path_factory.mktemp("eval_runs")))[0]
