import os
import sys

import pytest

# Tests import the packages from the checkout, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory):
    """A few hundred standard-library files as byte-level shards, shared by the training and launch tests."""
    from data_pipeline.make_shards import build_stdlib_shards

    out = tmp_path_factory.mktemp("stdlib") / "shards"
    build_stdlib_shards(str(out), max_files=300)
    return str(out)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
