"""
plumbing/workers.py -- start N local processes joined by gloo (the tests,
bench).
"""

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .commandline import leave


def free_port():
    """A TCP port nobody listens on right now (the OS picks it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, collective_timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout))
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"result{rank}.pt")
        dist.barrier()      # tear down together, once every rank is done
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    leave(0)


def spawn(fn, world_size, *args, timeout=180.0, collective_timeout=60.0):
    """Run fn(rank, world_size, *args) in world_size fresh processes joined by
    gloo on a free local port; return their results, ordered by rank.

    fn must be a module-level function of an importable module (the workers
    are started with "spawn" and import it by name). An exception in a worker
    is re-raised here with the worker's traceback, and a worker that hangs
    (one rank waiting in a collective the other never joined) is killed after
    `timeout` seconds instead of blocking the caller."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(rank, world_size, port, fn, args, out_dir, collective_timeout))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        hung = []
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                hung.append(p)
        for p in hung:   # only the processes started above, by handle
            p.kill()
            p.join(10)
        out = Path(out_dir)
        errors = [f"rank {r}:\n{(out / f'error{r}.txt').read_text()}"
                  for r in range(world_size) if (out / f"error{r}.txt").exists()]
        if errors:
            raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
        if hung:
            raise TimeoutError(f"{len(hung)} of {world_size} workers still running after {timeout:.0f} s")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"workers {bad} exited with codes {[procs[r].exitcode for r in bad]}")
        return [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(world_size)]
