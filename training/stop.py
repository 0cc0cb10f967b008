"""Stopping a run on SIGUSR1 or SIGTERM, and the outcome a launcher acts on.

USR1 (SLURM's warning before a time limit, a preemption, ``launch.slurm cancel --requeue``) means
"save and stop, to be resumed"; TERM (scancel, a time limit, torchrun, ``timeout``) means "save and
stop". Receiving one only records it: the ranks agree on it at the next step boundary (TERM wins over
USR1), save the last finished step and exit. The signals stay blocked in the trainer's threads and are taken
by a thread of their own, so the processes it starts (the JIT build's ninja and compilers, W&B's service,
DataLoader workers) inherit them blocked: a stop sent to every process of a SLURM step, or to a process
group, stops the trainer and kills none of its helpers half-way. Rank 0 then writes ``<run_dir>/outcome.json``
(finished or stopped, by which signal, at which step) before the last barrier, so a launcher can
tell "stopped with a checkpoint" from "stopped before any progress" whatever the exit statuses.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Exit status of a run stopped on a signal (its last finished step saved, or stopped before the first
# step with nothing to save): "resume me".
EXIT_STOPPED_TO_RESUME = 75
OUTCOME_FILE = "outcome.json"
# All-reduced with MAX: the strongest request of any rank decides.
_CODES = {None: 0, signal.SIGUSR1: 1, signal.SIGTERM: 2}
_SIGNALS = {code: signum for signum, code in _CODES.items()}
# The StopSignals the receiving thread reports to: the one installed last.
_receiver: Optional[StopSignals] = None
_receiving_thread: Optional[threading.Thread] = None


def block_stop_signals() -> None:
    """Block USR1 and TERM in this thread and the threads and processes it starts from now on; they wait
    pending until ``StopSignals.install`` receives them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _receive_stop_signals() -> None:
    while True:
        signum = signal.sigwait(STOP_SIGNALS)
        if _receiver is not None:
            _receiver.request(signum)


class StopSignals:
    """The stop signal this process received, if any; TERM (stop) outranks USR1 (stop to resume)."""

    def __init__(self):
        self.received: Optional[int] = None
        # What the ranks last agreed on (``agreed``).
        self.agreed_signal: Optional[int] = None

    def install(self) -> StopSignals:
        """Receive USR1 and TERM from now on (main thread only); one pending since ``block_stop_signals``
        arrives now. The signals stay blocked in this thread (see the module's doc)."""
        global _receiver, _receiving_thread
        _receiver = self
        block_stop_signals()
        # For threads started before the signals were blocked (a Trainer built in a process that did not
        # start from the CLI): a signal the kernel hands to one of them is recorded too, not fatal.
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.request)
        if _receiving_thread is None:
            _receiving_thread = threading.Thread(target=_receive_stop_signals, name="stop-signals", daemon=True)
            _receiving_thread.start()
        return self

    def request(self, signum: int, frame=None) -> None:
        if _CODES[signum] > _CODES[self.received]:
            self.received = signum

    def agreed(self, device) -> Optional[int]:
        """Collective over all ranks: the strongest stop signal any rank received, None if none did."""
        # Imported here: the trainer's CLI imports this module before torch (see block_stop_signals).
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(_CODES[self.received])], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.agreed_signal = _SIGNALS[int(flag.item())]
        return self.agreed_signal


def write_outcome(
    run_dir: str, stopped_by: Optional[int], start_step: int, step: int, checkpoint: Optional[str]
) -> str:
    """Write ``<run_dir>/outcome.json`` atomically; its path.

    outcome: "finished" or "stopped"; signal: "SIGUSR1"/"SIGTERM" for a stop; start_step: the step this
    start resumed at; step: the last finished step; checkpoint: the newest complete checkpoint (or null)."""
    record = {
        "outcome": "stopped" if stopped_by else "finished",
        "signal": signal.Signals(stopped_by).name if stopped_by else None,
        "start_step": start_step,
        "step": step,
        "checkpoint": checkpoint,
    }
    path = os.path.join(run_dir, OUTCOME_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path
