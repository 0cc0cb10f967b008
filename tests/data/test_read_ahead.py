"""ReadAhead: a source read one item ahead in a thread, in order, with its errors and its end."""

import os
import subprocess
import sys
import time

import pytest

from data_pipeline.read_ahead import ReadAhead

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_items_arrive_in_order_and_the_end_stays_the_end():
    reader = ReadAhead(x for x in range(5))
    assert list(reader) == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        next(reader)
    reader.close()


def test_an_error_is_raised_in_the_consumer_where_it_occurred():
    def source():
        yield 0
        yield 1
        raise ValueError("shard 3 is truncated")

    reader = ReadAhead(source())
    assert [next(reader), next(reader)] == [0, 1]
    for _ in range(2):
        with pytest.raises(ValueError, match="shard 3 is truncated"):
            next(reader)
    reader.close()


def test_the_next_item_is_read_while_the_consumer_works():
    read_s = 0.3

    def slow_source():
        for i in range(4):
            time.sleep(read_s)
            yield i

    reader = ReadAhead(slow_source())
    waits = []
    for _ in range(4):
        started = time.perf_counter()
        next(reader)
        waits.append(time.perf_counter() - started)
        time.sleep(2 * read_s)  # the training step: room for a slow machine to schedule the thread
    reader.close()
    assert waits[0] >= read_s * 0.9
    # Read in one go these would wait read_s each; read ahead, they are ready.
    assert all(wait < read_s / 2 for wait in waits[1:]), waits


def test_close_stops_an_endless_source_one_item_ahead_and_closes_it():
    pulled, closed = [], []

    def endless():
        try:
            while True:
                pulled.append(len(pulled))
                yield pulled[-1]
        finally:
            closed.append(True)

    reader = ReadAhead(endless())
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.2)
    # One item waits in the queue and one more is held by the thread, ready to queue.
    assert len(pulled) <= 5
    reader.close()
    assert closed == [True]
    assert not reader._thread.is_alive()


def test_dropping_the_reader_stops_its_thread_and_closes_the_source():
    closed = []

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.append(True)

    reader = ReadAhead(endless())
    next(reader)
    thread = reader._thread
    del reader
    thread.join(timeout=5)
    assert not thread.is_alive() and closed == [True]


# A source that is inside torch's C++ code (a matmul, GIL released) nearly all the time, left open.
BUSY_READER_LEFT_OPEN = """
import torch
from data_pipeline.read_ahead import ReadAhead

def busy():
    a = torch.randn(2000, 2000)
    try:
        while True:
            yield (a @ a).sum()
    finally:
        print("source closed", flush=True)

reader = ReadAhead(busy())
next(reader)
"""


def test_a_reader_left_open_is_stopped_at_exit_without_aborting_the_process():
    # Left to the interpreter's finalization, a daemon thread in C++ code is ended by pthread_exit,
    # which aborts the process (exit status -6, "terminate called without an active exception").
    done = subprocess.run(
        [sys.executable, "-c", BUSY_READER_LEFT_OPEN],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-2000:]
    assert done.stdout == "source closed\n"
