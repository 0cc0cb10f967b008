"""Process group and megatron-core parallel state, from torchrun's, SLURM's or no environment."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.tensor_parallel.random import initialize_rng_tracker


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # A plain "host" or "host1,host2" list needs no scontrol.
        return nodelist.split(",")[0]


def read_dist_env(environ=None) -> DistEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, else srun's SLURM_*, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", 0))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # Every task derives the same port from the job id; a requeued job keeps its id.
        port = int(env.get("MASTER_PORT", 20000 + job % 10000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), addr, port)
    # One plain process: any free port will do (a fixed default would clash with other jobs).
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Start the default process group: NCCL on GPUs, gloo on the CPU."""
    env = read_dist_env()
    if dist.is_initialized():
        return env
    # DeepSpeed and megatron read these from the environment too, whoever launched us.
    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    from datetime import timedelta

    dist.init_process_group(
        backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=timeout_minutes)
    )
    return env


def init_model_parallel(
    tensor_parallel: int, pipeline_parallel: int, seed: int = 1234, context_parallel: int = 1, virtual_pipeline: int = 1
) -> None:
    """megatron's groups in its default rank order tp-cp-ep-dp-pp: TP ranks adjacent, then CP, DP, PP.
    ``virtual_pipeline`` > 1 selects megatron's interleaved pipeline schedule."""
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel * context_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({tensor_parallel}) x "
            f"pipeline_parallel ({pipeline_parallel}) x context_parallel ({context_parallel})"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_parallel,
        pipeline_parallel,
        context_parallel_size=context_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
    )
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)
    else:
        # megatron forks its CUDA RNG stream around the sequence-parallel region's dropout; on the
        # CPU there is no such stream, and its inference tracker's fork leaves the CPU's as it is.
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_single_process(seed: int = 1234) -> None:
    """A world of one process (evaluation, export loading, tools): TP = PP = DP = 1."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    init_model_parallel(1, 1, seed)
