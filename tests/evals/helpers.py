"""What the evaluation CLI runs of conftest's eval_runs fixture used, and the tolerance of their losses."""

import torch

from tests.tolerance import tolerance

SEGMENT = 32
PASSKEY_ARGS = [
    "--lengths",
    "256,320",
    "--depths",
    "0,50,100",
    "--trials",
    "2",
    "--batch-size",
    "4",
    "--window-segments",
    "2",
]
PPL_BUCKETS = "64,128,256"
SEGMENT_BINS = 4
ABLATED_HEADS = [(1, 0), (0, 3)]
KEY_SCALE, QUERY_SCALE = 2.5, 1.5
TEXTS = [
    "The memory of an Infini-attention layer is a matrix and a vector per head. " * 5,
    "Streaming keeps them, and nothing else, from one segment to the next. " * 2,
]

# tiny_config's 2 layers (the widest sum over the MLP's 96) in every segment of the longest sequence scored.
LONGEST = max(320, *(len(text) for text in TEXTS))
LOSS_TOLERANCE = tolerance(torch.float32, 96, 2 * -(-LONGEST // SEGMENT))


def exported_reference(export_dir):
    """(ModelConfig, full state) of an export, for tests/evals/reference_model.py."""
    from modeling.export import read_export

    return read_export(export_dir)
