"""Can the compressive memory learn to recall? A synthetic task only the memory can solve.

    python experiments/memory_recall.py [--updates linear,delta] [--segments 4,16] [--key-tokens 2]
        [--segment-length 32] [--steps 800] [--lr 3e-3] [--seeds 0] [--device cpu|cuda]

Each sequence is S segments of N tokens of random filler (tokens 100-199). In the first segment a
marker (token 10) is followed by K key tokens (digits); in the last segment the marker comes again
and the model must predict the K key tokens after it. Local attention never sees the first segment
from the last, so only the memory can carry the key; the memory holds (S - 1) * N tokens when it is
read. A small model of this project's layers (megatron-core, Infini-attention) trains on the key
tokens' loss alone, with the gates on their own learning rate as in the trainer, and with the
gates forced local (memory ablated: chance is ln 10 = 2.30 nats a key token). Prints, per setting,
the mean key loss over the last 10% of the steps and the first step whose loss (mean of 20) fell
below 0.5 nats.

What it shows (docs/long-context.md): recall through the
memory is learned within a few hundred steps when the memory holds ~100 tokens, much later (or not
within the run) when it holds ~500, and the delta update learns it far slower than the linear one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MARKER, DIGIT0, FILLER0, FILLER_RANGE = 10, 48, 100, 100


def make_batch(batch, segment_length, segments, key_tokens, gen, device):
    """tokens, labels (next token) and the key tokens' loss mask, [batch, segments * segment_length]."""
    t = segments * segment_length
    if key_tokens + 1 > segment_length // 4:
        raise ValueError(f"--key-tokens {key_tokens} does not fit a quarter of a segment of {segment_length}")
    tokens = torch.randint(FILLER0, FILLER0 + FILLER_RANGE, (batch, t), generator=gen)
    key = torch.randint(DIGIT0, DIGIT0 + 10, (batch, key_tokens), generator=gen)
    # The key is written early in the first segment and asked for late in the last one.
    first = torch.randint(0, segment_length // 4, (batch,), generator=gen)
    last = torch.randint(t - segment_length // 4, t - key_tokens - 1, (batch,), generator=gen)
    mask = torch.zeros(batch, t)
    rows = torch.arange(batch)
    for at in (first, last):
        tokens[rows, at] = MARKER
        for i in range(key_tokens):
            tokens[rows, at + 1 + i] = key[:, i]
    for i in range(key_tokens):
        mask[rows, last + i] = 1.0  # the marker and the key tokens before the next one predict it
    labels = torch.roll(tokens, -1, dims=1)
    return tokens.to(device), labels.to(device), mask.to(device)


def train_one(update, segments, args, seed, ablate, device):
    from modeling.config import ModelConfig, build_transformer_config
    from modeling.cpu_compat import megatron_on_cpu
    from modeling.init import init_weights
    from modeling.model import build_model

    cfg = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.heads,
        ffn_hidden_size=3 * args.hidden,
        vocab_size=258,
        segment_length=args.segment_length,
        update=update,
        init_method_std=args.init_std,
    )
    with megatron_on_cpu():
        model = build_model(
            build_transformer_config(cfg, use_cpu_initialization=True),
            cfg.padded_vocab_size(),
            rotary_base=cfg.rotary_base,
        )
        init_weights(model, seed)
    model.to(device)
    gates = [p for name, p in model.named_parameters() if name.endswith("core_attention.gate")]
    others = [p for name, p in model.named_parameters() if not name.endswith("core_attention.gate")]
    if ablate:
        for gate in gates:
            gate.data.fill_(-30.0)
            gate.requires_grad_(False)
    opt = torch.optim.AdamW(
        [
            {"params": others, "lr": args.lr, "weight_decay": 0.1},
            {"params": gates, "lr": args.gate_lr, "weight_decay": 0.0},
        ]
    )
    gen = torch.Generator().manual_seed(seed)
    losses, learned_at = [], None
    for step in range(1, args.steps + 1):
        tokens, labels, mask = make_batch(args.batch, args.segment_length, segments, args.key_tokens, gen, device)
        with megatron_on_cpu():
            per_token, _ = model(tokens, labels)
            loss = (per_token * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if learned_at is None and len(losses) >= 20 and sum(losses[-20:]) / 20 < 0.5:
            learned_at = step
    tail = losses[-max(1, args.steps // 10) :]
    gate = torch.sigmoid(torch.cat([g.detach().float() for g in gates])).mean().item()
    return sum(tail) / len(tail), learned_at, gate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--updates", default="linear,delta")
    ap.add_argument("--segments", default="4,16", help="segments a sequence (the memory holds all but the last)")
    ap.add_argument("--segment-length", type=int, default=32)
    ap.add_argument("--key-tokens", type=int, default=2)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--gate-lr", type=float, default=1e-2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--init-std", type=float, default=0.08)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--no-ablated", action="store_true", help="skip the runs with the memory ablated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)

    from training.distributed import init_single_process

    init_single_process()
    device = torch.device(a.device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{card}; {a.layers} layers x {a.hidden}, {a.heads} heads, segments of {a.segment_length}, "
        f"{a.key_tokens} key tokens, {a.steps} steps of {a.batch}, lr {a.lr}, gate lr {a.gate_lr}, "
        f"init std {a.init_std}; chance {math.log(10):.2f} nats"
    )
    print(
        "| update | segments | tokens in memory | seed | memory | key loss (last 10%) | learned at step "
        "| mean gate | s |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for update in a.updates.split(","):
        for segments in (int(s) for s in a.segments.split(",")):
            for seed in (int(s) for s in a.seeds.split(",")):
                for ablate in (False,) if a.no_ablated else (False, True):
                    started = time.perf_counter()
                    loss, learned_at, gate = train_one(update, segments, a, seed, ablate, device)
                    print(
                        f"| {update} | {segments} | {(segments - 1) * a.segment_length} | {seed} | "
                        f"{'ablated' if ablate else 'on'} | {loss:.3f} | {learned_at or '-'} | "
                        f"{gate:.3f} | {time.perf_counter() - started:.0f} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
