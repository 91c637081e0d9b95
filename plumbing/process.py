"""
plumbing/process.py -- who this process is: rank, world size, device, its
place in the (dp, ep) mesh, read from torchrun's environment (or the only
process), and the collectives a run uses to agree.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import balancers

from .files import first_line
from .mesh import Mesh, MeshLayout


@dataclass
class Proc:
    """One process of the run. torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain
    `python` is rank 0 of 1. Read from the environment first, so the flags can
    be checked before the process group starts (a mistake then stops every
    rank with one line instead of a hung rendezvous)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # Which experts this rank holds and whom it exchanges tokens with. One
    # process needs no groups; several get theirs in start().
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.mesh is None and self.world_size == 1:
            self.mesh = Mesh()

    @classmethod
    def from_env(cls, device="auto"):
        try:
            world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        except ValueError:
            world_size = rank = -1
        if not 0 <= rank < world_size:
            # A scheduler's or a hand-written environment; torchrun's is always right.
            raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} and RANK={os.environ.get('RANK')!r} "
                             f"are not a process of a run (need 0 <= RANK < WORLD_SIZE): start it with "
                             f"torchrun, or unset both for one process")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device cuda: this process sees no CUDA GPU{visible_devices()}; use --device cpu "
                             f"or auto")
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            return cls(rank, world_size, torch.device("cuda", local_gpu()))
        return cls(rank, world_size, torch.device("cpu"))

    def start(self, ep_size=None):
        """Join the process group: nccl between GPUs, gloo between CPU processes.
        A bounded timeout, so that if one rank dies the others fail instead of
        waiting forever. Then form the (dp, ep) mesh: ep_size ranks share the
        experts out (default: all of them), world_size / ep_size replicas.
        (train.check_args has checked that ep_size divides the world.)"""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            backend, timeout = "nccl" if self.device.type == "cuda" else "gloo", timedelta(minutes=5)
            try:
                if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                    # torchrun --max-restarts starts the processes again on the
                    # store of the failed attempt, whose keys (the dead
                    # processes' addresses) would be read as this attempt's:
                    # the new processes hang or fail to connect. A key prefix
                    # per attempt keeps the attempts apart.
                    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                                          is_master=False, timeout=timeout)
                    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
                    dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                            timeout=timeout)
                else:
                    dist.init_process_group(backend, timeout=timeout)
            except dist.DistNetworkError as e:
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise ValueError(f"rank {self.rank} cannot join the process group at {where} "
                                 f"({first_line(e)}): is that port in use? set another MASTER_PORT, "
                                 f"or start with torchrun --standalone") from None
        if self.world_size > 1:
            self.mesh = self.form_mesh(ep_size or self.world_size)
        return self

    def form_mesh(self, ep_size):
        """The process groups of MeshLayout's grid, from PyTorch's own
        DeviceMesh (a collective: every rank calls it). The groups it makes
        are checked against the layout the experts are assigned by, so the
        two can never disagree about who holds what."""
        layout = MeshLayout(self.world_size, ep_size)
        grid = init_device_mesh(self.device.type, (layout.dp_size, ep_size), mesh_dim_names=("dp", "ep"))
        ep_group, dp_group = grid["ep"].get_group(), grid["dp"].get_group()
        mine = [g for g in layout.ep_groups() if self.rank in g] + [g for g in layout.dp_groups() if self.rank in g]
        assert [dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(dp_group)] == mine, \
            "init_device_mesh laid the ranks out differently from MeshLayout"
        assert grid.get_local_rank("ep") == layout.ep_rank(self.rank)
        return Mesh(self.rank, self.world_size, ep_size, ep_group, dp_group, grid)

    @property
    def main(self):
        return self.rank == 0

    def log(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def all_reduce(self, t, op="sum"):
        return balancers.all_reduce(t, self.world_size, op)

    def any_rank(self, flag):
        """True on every rank if it is true on any (stop signals, failures)."""
        return bool(self.all_reduce(torch.tensor(float(flag), device=self.device), "max").item())

    def share(self, value):
        """Rank 0's `value` on every rank (any picklable object). (Collective.)"""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same_everywhere(self, settings):
        """Every rank must train the same run: its flags and its data. Each
        rank's settings (name -> value; the corpus as a fingerprint) are
        gathered on every rank, so a flag given to one node only, or a data
        folder that differs between machines, stops every rank with the same
        line instead of letting the replicas silently diverge. (Collective.)"""
        if self.world_size == 1:
            return
        every = [None] * self.world_size
        dist.all_gather_object(every, settings)
        for name in settings:
            ranks_by_value = {}
            for r, s in enumerate(every):
                ranks_by_value.setdefault(repr(s.get(name)), []).append(r)
            if len(ranks_by_value) > 1:
                what = "; ".join(f"rank {', '.join(map(str, rs))}: {v}" for v, rs in ranks_by_value.items())
                raise ValueError(f"the processes were started differently: {name} differs ({what}); "
                                 f"give every node the same flags and the same data")


class ThisProcessError(ValueError):
    """A mistake in this process's own environment, not in the flags every
    process shares: cli prints it from whichever process meets it, since
    the processes that print for their node (LOCAL_RANK 0) may not meet it."""


def visible_devices():
    """CUDA_VISIBLE_DEVICES as words to add to a message, if it is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"


def local_gpu():
    """This process's GPU: number LOCAL_RANK among those it sees (torchrun
    gives each process of a node its own). Checked here, before the process
    group, because torch.cuda.set_device on a GPU that is not there dies
    with "invalid device ordinal" and a traceback."""
    raw = os.environ.get("LOCAL_RANK", "0")
    try:
        local = int(raw)
    except ValueError:
        local = -1
    count = torch.cuda.device_count()
    if not 0 <= local < count:
        sees = f"{count} GPU{'' if count == 1 else 's'}{visible_devices()}"
        raise ThisProcessError(
            f"LOCAL_RANK {raw} but this process sees {sees}, so it has no GPU number {raw}: launch one "
            f"process per visible GPU (torchrun --nproc_per_node={max(count, 1)}), or let every process see "
            f"all of its node's GPUs (unset CUDA_VISIBLE_DEVICES; with SLURM, --gpus-per-node instead of "
            f"--gpus-per-task)")
    return local
