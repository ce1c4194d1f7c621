"""Runs a function on N torch.distributed processes (gloo on the CPU, NCCL on GPUs) from a test:
the tensor-parallel and the sharded MAGE-FT tests share it."""
import socket
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, world: int, args: tuple, timeout: float = 300, spawn: bool = False) -> float:
    """Runs ``worker(rank, world, port, *args)`` on ``world`` processes; fails the test when they
    do not finish within ``timeout`` s (or one fails); returns the seconds they took.

    fork by default: the children inherit the imported modules (a spawn re-imports torch and
    transformers per process, most of a run on a 2-core machine); CUDA needs ``spawn``, and so
    does a parent that has used CUDA (autograd's device threads cannot be forked)."""
    import torch
    import torch.multiprocessing as mp

    spawn = spawn or torch.cuda.is_initialized()

    t0 = time.perf_counter()
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                             start_method="spawn" if spawn else "fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout} s")
    return time.perf_counter() - t0
