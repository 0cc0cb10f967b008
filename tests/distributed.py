"""Run a function in N gloo processes, each with fresh torch, megatron and DeepSpeed state.

The processes fork from one server process that imported those libraries once: importing them costs
about 4 s of CPU a process, and the suite starts a few hundred. Nothing but imports runs in the server,
so every child starts from the state a fresh interpreter would have after the same imports."""

import multiprocessing as mp
import os
import socket
import tempfile
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "deepspeed", "megatron.core", "training.train"]


def _entry(fn, rank, world_size, port, out_dir, args, environ):
    # The server's environment is the test process's when the server started; a test's is the one now.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=600):
    """fn(rank, world_size, *args) in world_size processes; returns the list of their results."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    port = free_port()
    environ = dict(os.environ)
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, port, out_dir, args, environ))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        for r, p in enumerate(procs):
            err = os.path.join(out_dir, f"{r}.err")
            if os.path.exists(err):
                errors.append(f"rank {r}:\n" + open(err).read())
            elif p.exitcode != 0:
                errors.append(f"rank {r}: exit code {p.exitcode}")
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
