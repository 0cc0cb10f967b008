"""Python's garbage collector in training: collections timed, the objects alive after the compiling steps frozen."""

import gc
import time

from tests.distributed import run_distributed
from tests.recording import record
from tests.training.helpers import train_overrides
from training.garbage_collection import CollectionTimer


class Cycle:
    def __init__(self):
        self.me = self


def test_timer_counts_a_collection_within_its_wall_time():
    timer = CollectionTimer()
    timer.install()
    try:
        for _ in range(200_000):
            Cycle()
        timer.take()
        started = time.perf_counter()
        gc.collect()
        wall = time.perf_counter() - started
        counted = timer.take()
    finally:
        timer.remove()
    assert 0 < counted <= wall
    assert timer.take() == 0.0
    gc.collect()
    assert timer.take() == 0.0  # removed: no longer counting


def frozen_worker(rank, world, overrides):
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = record(trainer)
    model_id = id(trainer.model)
    try:
        trainer.fit()
        frozen = gc.get_freeze_count()
        model_scanned = any(id(obj) == model_id for obj in gc.get_objects())
    finally:
        trainer.close()
    return dict(
        history=history,
        frozen=frozen,
        model_scanned=model_scanned,
        frozen_after_close=gc.get_freeze_count(),
        model_scanned_after_close=any(id(obj) == model_id for obj in gc.get_objects()),
    )


def test_objects_alive_after_the_compiling_steps_leave_the_collector_until_close(stdlib_shards, tmp_path):
    overrides = train_overrides(stdlib_shards, str(tmp_path), **{"schedule.steps": 3})
    result = run_distributed(frozen_worker, 1, overrides)[0]
    steps = [row for row in result["history"] if "loss" in row]
    assert len(steps) == 3 and all(row["gc_s"] >= 0.0 for row in steps)
    assert result["frozen"] > 0 and not result["model_scanned"]
    assert result["frozen_after_close"] == 0 and result["model_scanned_after_close"]
