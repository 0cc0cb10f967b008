"""Reading one batch ahead in a thread, so that the next batch is ready when a training step ends."""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Generator, Generic, Optional, TypeVar

Item = TypeVar("Item")

_ITEM, _END, _ERROR = "item", "end", "error"
# How long the interpreter's exit waits for a reading thread to stop.
_EXIT_JOIN_S = 30.0


def _put(ready: queue.Queue, stop: threading.Event, entry) -> bool:
    """Queue `entry` unless reading was stopped meanwhile; whether it was queued."""
    while not stop.is_set():
        try:
            ready.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _read(source: Generator, ready: queue.Queue, stop: threading.Event) -> None:
    # No reference to the ReadAhead: once its owner drops it, __del__ stops this thread.
    try:
        for item in source:
            if not _put(ready, stop, (_ITEM, item)):
                return
        _put(ready, stop, (_END, None))
    except BaseException as error:  # handed to the consumer, who raises it
        _put(ready, stop, (_ERROR, error))
    finally:
        source.close()


class ReadAhead(Generic[Item]):
    """Iterates `source` in a background thread, at most one item ahead of the consumer.

    While the training step runs, the main thread mostly waits on the GPU with the GIL released;
    the thread uses that time to receive the workers' items and assemble the next batch (numpy's
    copies release the GIL too). An exception raised by `source` is raised by `__next__` in the
    consumer's thread, at the position where it occurred. `close()`, or dropping the ReadAhead,
    stops the thread, which then closes `source` (its `finally` blocks run in the thread that runs
    it)."""

    def __init__(self, source: Generator[Item, None, None], name: str = "read-ahead"):
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_read, args=(source, self._ready, self._stop), name=name, daemon=True)
        self._thread.start()
        _open.add(self)

    def __iter__(self) -> ReadAhead[Item]:
        return self

    def __next__(self) -> Item:
        kind, value = self._ready.get()
        if kind == _ITEM:
            return value
        # The source is done; later calls end the same way instead of waiting forever.
        self._ready.put((kind, value))
        if kind == _END:
            raise StopIteration
        raise value

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop reading and wait (at most `timeout` seconds, if given) for the thread to close the
        source (an item it is reading is finished first, then dropped)."""
        self._stop.set()
        self._thread.join(timeout)

    def __del__(self) -> None:
        self._stop.set()


_open: weakref.WeakSet[ReadAhead] = weakref.WeakSet()


@atexit.register
def _stop_open_readers() -> None:
    # A daemon thread still running when the interpreter finalizes is ended by pthread_exit as soon as
    # it next takes the GIL; unwinding through torch's C++ frames there aborts the whole process
    # ("terminate called without an active exception", exit status -6). So every reader left open is
    # stopped while the interpreter still runs. atexit runs this before multiprocessing's own exit
    # handler (registered earlier), so the DataLoader's workers are still there to be shut down.
    for reader in list(_open):
        reader.close(_EXIT_JOIN_S)
