"""Export a checkpoint to a model directory (``modeling.export``: model.safetensors + model_config.yaml).

    torchrun --nproc-per-node N -m training.export --checkpoint DIR/step_N --out EXPORT_DIR [key=value ...]

Run it under the checkpoint's own layout (torchrun / srun with its world size): the trainer resumes the
checkpoint and every rank takes part in gathering the full tensors; rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
import sys

from modeling.export import export_model
from training.config import load_config
from training.train import Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint to model.safetensors + model_config.yaml")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_<N>)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", help="run config (default: the checkpoint's config.yaml)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = args.config or os.path.join(args.checkpoint, "config.yaml")
    trainer = Trainer(load_config(config, [*args.overrides, f"checkpoint.resume={args.checkpoint}"]))
    try:
        export_model(trainer.model, trainer.cfg.model, args.out)
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"exported {args.checkpoint} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
