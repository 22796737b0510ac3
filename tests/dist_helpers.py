"""Spawning a small gloo process group for the multi-process tests (CPU, one thread per rank).

A test module runs one ``worker(rank, path, *args)`` per rank with :func:`run_ranks`; each worker
calls :func:`init_group` first and :func:`save_result` last, and the test reads every rank's result.
The whole group is killed if it outlives ``hard_timeout`` seconds, so that a rank waiting in a
collective the others never join fails the test instead of hanging the suite; the process group's
own ``timeout`` (the collectives') should be shorter still, so that a hang shows up as an error.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, port: int, timeout_s: float = 20.0, world: int = WORLD) -> None:
    """Join the gloo group of :func:`run_ranks` with a collective timeout of ``timeout_s`` seconds."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def save_result(path: str, rank: int, result: Any) -> None:
    """What this rank hands back to the test; then leave the group (after every rank has saved)."""
    torch.save(result, f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _entry(rank: int, worker: Callable[..., None], port: int, path: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # for workers that init by env
    worker(rank, port, path, *args)


def run_ranks(worker: Callable[..., None], *args: Any, world: int = WORLD, hard_timeout: float = 240.0) -> list[Any]:
    """Run ``worker(rank, port, path, *args)`` on ``world`` spawned processes; return each rank's
    :func:`save_result`. Fails the test (after killing the processes) past ``hard_timeout`` seconds."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result")
        ctx = mp.start_processes(_entry, args=(worker, port, path, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + hard_timeout
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for proc in ctx.processes:  # the processes this call started, by handle
                    if proc.is_alive():
                        proc.kill()
                pytest.fail(f"the {world} ranks did not finish within {hard_timeout:.0f} s (a rank hung)")
        return [torch.load(f"{path}.{r}", weights_only=False) for r in range(world)]
