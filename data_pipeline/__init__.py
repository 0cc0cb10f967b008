"""Streaming long-document data pipeline: token shards on WebDataset, read as lanes with exact,
elastic resume. See data_pipeline/README.md."""

from .config import DataConfig, RunDataConfig, SourceConfig
from .loader import (
    TrainLoader,
    ValidLoader,
    build_train_loader,
    build_valid_loader,
    gather_state_dict,
    merge_state_dicts,
)
from .shards import DataError, open_shard_set, read_index
from .tokenizer import BYTES_EOS_ID, BYTES_PAD_ID, BYTES_VOCAB_SIZE

__all__ = [
    "DataConfig",
    "RunDataConfig",
    "SourceConfig",
    "TrainLoader",
    "ValidLoader",
    "build_train_loader",
    "build_valid_loader",
    "gather_state_dict",
    "merge_state_dicts",
    "DataError",
    "open_shard_set",
    "read_index",
    "BYTES_EOS_ID",
    "BYTES_PAD_ID",
    "BYTES_VOCAB_SIZE",
]
