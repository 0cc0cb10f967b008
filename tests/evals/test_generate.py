"""Generation: greedy decoding against argmax of an independent float64 forward over the growing
sequence (across segment boundaries), the CLI, eos, and nucleus sampling's distribution."""

import contextlib
import io

import pytest
import torch

from tests.distributed import run_distributed

SEGMENT, PROMPT, NEW = 8, 13, 14  # the prompt ends mid-segment; decoding crosses two boundaries
CLI_PROMPT = "def f(x):\n    return"


def reference_greedy(state, cfg, prompt, steps):
    """Tokens and the smallest top-1 margin, re-running the whole sequence every step."""
    from tests.evals.reference_model import reference_logits

    seq, margins = prompt.clone(), []
    for _ in range(steps):
        logits = reference_logits(state, cfg, seq)[:, -1, : cfg.vocab_size]
        top2 = logits.topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).min().item())
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1] :], min(margins)


def worker(rank, world, export_dir):
    from training.distributed import init_single_process

    init_single_process()
    from evals.generate import main as generate_cli
    from modeling import generate as generation
    from modeling.export import export_model
    from modeling.streaming import StreamingModel
    from tests.evals.models import full_state, tiny_config, tiny_model

    out = {}
    for update in ("linear", "delta"):
        cfg = tiny_config(segment_length=SEGMENT, update=update)
        model = tiny_model(cfg, seed=2)
        prompt = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(5))
        stream = StreamingModel(model, cfg.vocab_size, window_segments=1)
        got = generation.generate(stream, prompt, NEW)
        want, margin = reference_greedy(full_state(model), cfg, prompt, NEW)
        eos = int(got[0, 3])
        stopped = generation.generate(stream, prompt[:1], NEW, eos_id=eos)
        out[update] = dict(got=got, want=want, margin=margin, eos=eos, stopped=stopped)

    cfg = tiny_config(segment_length=SEGMENT)
    model = tiny_model(cfg, seed=3)
    export_model(model, cfg, export_dir)
    prompt = torch.tensor([list(CLI_PROMPT.encode())])
    want, margin = reference_greedy(full_state(model), cfg, prompt, 10)
    printed = []
    for args in (["--max-new-tokens", "10"], ["--top-p", "0.9", "--seed", "1"], ["--top-p", "0.9", "--seed", "1"]):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            generate_cli(["--model", export_dir, "--prompt", CLI_PROMPT, "--window-segments", "1"] + args)
        printed.append(buffer.getvalue())
    out["cli"] = dict(printed=printed, want=want, margin=margin)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(worker, 1, str(tmp_path_factory.mktemp("generate") / "export"))[0]


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_greedy_equals_argmax_of_full_forward_passes(results, update):
    r = results[update]
    assert r["margin"] > 1e-3  # no near-ties: the argmax is well defined at every step
    assert torch.equal(r["got"], r["want"])


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_generation_stops_at_eos(results, update):
    r = results[update]
    assert r["stopped"].tolist() == [r["got"][0, :4].tolist()]


def test_cli_prints_the_greedy_continuation_and_samples_reproducibly(results):
    r = results["cli"]
    assert r["margin"] > 1e-3
    want = bytes(t for t in r["want"][0].tolist() if t < 256).decode("utf-8", errors="replace")
    assert r["printed"][0] == want + "\n"
    assert r["printed"][1] == r["printed"][2]


def test_nucleus_sampling_draws_from_the_renormalised_top_p_set():
    from modeling.generate import next_token

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(40000, 4)
    draws = next_token(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    # {0.5, 0.3} reach 0.7; renormalised: 0.625, 0.375.
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375], dtype=torch.float64), atol=0.01, rtol=0)
    hot = next_token(logits[:20000], temperature=2.0, top_p=1.0, generator=torch.Generator().manual_seed(1))
    tempered = probs.sqrt() / probs.sqrt().sum()
    freq = torch.bincount(hot, minlength=4).double() / len(hot)
    torch.testing.assert_close(freq, tempered.double(), atol=0.015, rtol=0)
    assert torch.equal(next_token(logits[:3], temperature=0.0), torch.tensor([1, 1, 1]))
