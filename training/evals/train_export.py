"""Train, then export the model for evaluation: ``training.train`` plus ``training.export.export_model``.

    python -m training.evals.train_export --config RUN.yaml --export DIR [--max-minutes M] [key=value ...]
    torchrun --nproc-per-node N -m training.evals.train_export ...   (any TP/PP/DP layout)

--max-minutes is a time budget for the training loop: when it runs out the trainer stops as on
SIGTERM (after the current step, saving a checkpoint) and the model is exported all the same.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import torch.distributed as dist

from training.config import ConfigError, load_config
from modeling.export import export_model
from training.train import NonFiniteLossError, Trainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evals.train_export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--export", required=True, metavar="DIR")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    try:
        trainer = Trainer(load_config(a.config, a.overrides))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    timer = None
    if a.max_minutes is not None:
        # Every rank arms its own timer; the trainer stops all ranks at the same step.
        timer = threading.Timer(a.max_minutes * 60.0, trainer.request_stop, args=(signal.SIGTERM, None))
        timer.daemon = True
        timer.start()
    try:
        finished = trainer.fit()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        if timer is not None:
            timer.cancel()
        trainer.close()
    trainer.print(f"trained {trainer.state.step} steps in {(time.perf_counter() - started) / 60:.1f} min"
                  + ("" if finished else " (stopped by the time budget)"))
    export_model(trainer.model, trainer.cfg.model, a.export)
    trainer.print(f"exported {a.export}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
