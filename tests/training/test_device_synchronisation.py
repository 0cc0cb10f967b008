"""A training step queues its microbatches without waiting for the device between them."""

from tests.distributed import run_distributed
from tests.training.helpers import train_overrides


def counted_synchronisations_worker(rank, world, overrides):
    from deepspeed.accelerator import get_accelerator

    from training.config import load_config
    from training.train import Trainer

    # DeepSpeed and the trainer reach the device through this accelerator object; count its calls.
    accelerator = get_accelerator()
    synchronise = accelerator.synchronize
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return synchronise(*args, **kwargs)

    accelerator.synchronize = counting
    trainer = Trainer(load_config(None, overrides))
    try:
        trainer.fit()
    finally:
        trainer.close()
        accelerator.synchronize = synchronise
    return len(calls)


def test_no_device_synchronisation_between_microbatches(stdlib_shards, tmp_path):
    # Four microbatches a step, past DeepSpeed's throughput timer's first two steps: a timer left on
    # synchronises at each microbatch's forward and at the step.
    overrides = train_overrides(stdlib_shards, str(tmp_path), **{"schedule.steps": 4, "parallel.micro_batch_lanes": 1})
    assert run_distributed(counted_synchronisations_worker, 1, overrides) == [0]
