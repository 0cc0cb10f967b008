"""Each step logs how long the trainer waited for its batch: the time the data pipeline held up the GPU."""

import time

from tests.distributed import run_distributed
from tests.recording import record
from tests.training.helpers import train_overrides

# Far longer than a step of the tiny model, so that a step time holding the wait shows it.
DELAY_S = 1.0


class DelayedLoader:
    """The trainer's own loader, with the batch of one step held back DELAY_S seconds."""

    def __init__(self, loader, delayed_step: int):
        self.loader = loader
        self.delayed_step = delayed_step

    def __iter__(self):
        for step, batch in enumerate(self.loader, start=1):
            if step == self.delayed_step:
                time.sleep(DELAY_S)
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def delayed_batch_worker(rank, world, overrides):
    from training.config import load_config
    from training.train import Trainer

    trainer = Trainer(load_config(None, overrides))
    trainer.train_loader = DelayedLoader(trainer.train_loader, delayed_step=2)
    rows = record(trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return [row for row in rows if "loss" in row]


def test_the_wait_for_a_late_batch_is_logged_outside_the_step_time(stdlib_shards, tmp_path):
    overrides = train_overrides(stdlib_shards, str(tmp_path), **{"schedule.steps": 3})
    steps = run_distributed(delayed_batch_worker, 1, overrides)[0]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all(row["data_wait_s"] >= 0.0 for row in steps)
    assert steps[1]["data_wait_s"] >= DELAY_S
    # The step's own time starts once its batch is there.
    assert steps[1]["step_time_s"] < DELAY_S
