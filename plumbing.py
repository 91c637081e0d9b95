"""
plumbing.py -- what a training run needs that is not the lesson.

train.py reads like the papers: settings, model, train_step, the
measurements, the loop. Everything a real run also needs so that it never
loses work lives here, in the order a run meets it:

  1. Proc         who this process is (rank, world size, device, its place
                  in the (dp, ep) mesh), from torchrun's environment or as
                  the only process
  2. RunDir       the output folder: a lock so two runs cannot share it, the
                  log (rewritten atomically on resume, strictly valid JSON),
                  summary.json; a run id in all three, and a new run that
                  replaces an old one only at its first checkpoint
  3. checkpoints  torch.distributed.checkpoint's per-rank shards (each rank
                  writes only its own experts, and keeps only their rows
                  when it reads), resharded so any number of processes and
                  any --ep-size can resume; written only from a finite
                  state, kill-safe, with checksums verified before anything
                  is loaded
  4. StopFlag     SIGTERM or Ctrl-C: finish the step, save, exit (every rank
                  at the same step)
  5. cli / leave  the command line: --help's defaults, the memory check,
                  user mistakes as one line and exit code 2; processes that
                  used torch.distributed leave without the teardown
  6. spawn        start N local processes joined by gloo (tests, bench.py)
"""

import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import signal
import socket
import sys
import shutil
import tempfile
import traceback
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from balancers import BALANCERS, all_reduce
from moe import Mesh, MeshLayout, is_expert_param

# ----------------------------------------------------------------------------
# 1. Who am I.


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
            raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU; use --device cpu or auto")
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            return cls(rank, world_size, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
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
        """The process groups of moe.MeshLayout's grid, from PyTorch's own
        DeviceMesh (a collective: every rank calls it). The groups it makes
        are checked against the layout the experts are assigned by, so the
        two can never disagree about who holds what."""
        layout = MeshLayout(self.world_size, ep_size)
        grid = init_device_mesh(self.device.type, (layout.dp_size, ep_size), mesh_dim_names=("dp", "ep"))
        ep_group, dp_group = grid["ep"].get_group(), grid["dp"].get_group()
        mine = [g for g in layout.ep_groups() if self.rank in g] + [g for g in layout.dp_groups() if self.rank in g]
        assert [dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(dp_group)] == mine, \
            "init_device_mesh laid the ranks out differently from moe.MeshLayout"
        assert grid.get_local_rank("ep") == layout.ep_rank(self.rank)
        return Mesh(self.rank, self.world_size, ep_size, ep_group, dp_group, grid)

    @property
    def main(self):
        return self.rank == 0

    def log(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def all_reduce(self, t, op="sum"):
        return all_reduce(t, self.world_size, op)

    def agree(self, flag):
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


# ----------------------------------------------------------------------------
# 2. The output folder.

def finite_json(record, indent=None):
    """A record as strict JSON: NaN and infinities are not JSON, so they
    become null and the record names them under "nonfinite"."""
    bad = []

    def clean(v, key):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(key)
            return None
        if isinstance(v, dict):
            return {k: clean(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x, key) for x in v]
        return v
    out = clean(record, None)
    if bad:
        out["nonfinite"] = sorted(set(bad))
    return json.dumps(out, allow_nan=False, indent=indent)


def first_line(e):
    """An exception's message as one short line (PyTorch's span many)."""
    lines = str(e).strip().splitlines()
    return " ".join(lines[0].split())[:200] if lines else type(e).__name__


def disk_is_full(folder, e):
    """Did a write into `folder` fail for lack of space? An OSError says so
    itself; torch.save writes through a C++ zip writer whose RuntimeError
    only says that the write failed ("unexpected pos", "file write failed"),
    so then the free space is asked as well."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(e, RuntimeError):
        return False
    if any(s in str(e) for s in ("unexpected pos", "file write failed")):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


def write_atomic(path, write):
    """write(f) into a temporary file beside `path`, then rename it over path:
    a reader (or a crash) sees the old file or the new one, never half. A full
    disk, or a folder that may not be written, becomes one line and leaves no
    temporary file behind."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise cannot_write(path, e) from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes it private; results are for everyone
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_is_full(path.parent, e)    # asked before the temporary file frees its space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full or isinstance(e, (OSError, RuntimeError)):      # RuntimeError: torch.save's C++ writer
            raise cannot_write(path, e, full) from None
        raise


def cannot_write(path, e, full=None):
    """The one line for a write that failed, with what to do about it."""
    if full or (full is None and disk_is_full(path.parent, e)):
        return ValueError(f"the disk holding {path.parent} is full; free some space and run again with "
                          f"--resume (the previous {path.name} is intact)")
    return ValueError(f"cannot write {path} ({getattr(e, 'strerror', None) or first_line(e)}); "
                      f"check the folder's permissions and space, then run again with --resume")


def share_failure(proc, write, what):
    """Run write() on rank 0 only, and share how it went: if it failed, every
    rank raises, so no rank is left waiting for rank 0 in the next collective
    (where it would die of a lost connection, with a traceback of its own).
    Only rank 0 knows the reason; the others say where to find it. (Collective.)"""
    error = None
    if proc.main:
        try:
            write()
        except ValueError as e:
            error = e
    if proc.agree(error is not None):
        raise error or ValueError(f"rank 0 could not write {what} (rank 0's line says why)")


STAGE, SWAP, MOVES = ".next", ".swap", "MOVES"          # folders inside OUT, and the swap's list; see RunDir
RUN_FILES = ("summary.json", "log.jsonl", "ckpt", "ckpt.pt")   # in the order a swap replaces them


def new_run_id():
    """A run's name for its files: ckpt.pt, every log line and summary.json
    carry it, so that files of two different runs are never taken for one."""
    return uuid.uuid4().hex[:12]


class RunDir:
    """--out: ckpt.pt and ckpt/ (the checkpoint), log.jsonl, summary.json, and a lock.

    The lock is an flock on OUT/.lock held for the whole run: a second run
    on the same folder fails at once with one line, and since the kernel
    drops an flock when its process dies, a killed run never leaves a stale
    lock behind.

    These always belong to one run (they carry its run id). A run
    started in a folder that holds another one (--overwrite) writes into
    OUT/.next and replaces the old files only once its first checkpoint is
    on disk: any failure or kill before that leaves the old run byte for
    byte. The replacement is a rename of .next to .swap (the moment the new
    run becomes the run) and then one rename per file or folder; if a kill falls
    between those, the next run in OUT finishes them before anything else."""

    def __init__(self, out, proc, resume, overwrite):
        self.out, self.proc = Path(out), proc
        self.ckpt, self.log_path, self.summary = (self.out / name for name in ("ckpt.pt", "log.jsonl", "summary.json"))
        self.shards = shard_root(self.ckpt)
        self.lock = self.logf = self.stage = self.run_id = self.error = None
        self.resume = resume is True
        if not proc.main:
            return
        if resume is True and not self.ckpt.exists() and not (self.out / SWAP / "ckpt.pt").exists():
            # Before mkdir: a mistyped --out must not leave an empty folder behind.
            raise ValueError(f"--resume: no checkpoint at {self.ckpt}; run without --resume first")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.out / ".lock", "w")
        except OSError as e:
            raise ValueError(f"--out {out} cannot be written ({e.strerror}): choose another folder") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise ValueError(f"another run is writing to {out} right now: wait for it, or choose another --out") from None
        try:
            self.finish_swap()
            self.check(resume, overwrite)
            self.remove_stale()
            if not self.resume and any(p.exists() for p in (self.ckpt, self.log_path, self.summary)):
                self.stage = self.out / STAGE
                self.stage.mkdir()
        except OSError as e:
            self.close()
            raise ValueError(f"--out {out} cannot be used ({e.strerror or first_line(e)}): check its "
                             f"permissions, or choose another folder") from None
        except ValueError:
            self.close()
            raise

    def check(self, resume, overwrite):
        """May this run use the folder, and does it continue the run there?"""
        for p in (self.ckpt, self.log_path, self.summary):
            if p.exists() and not p.is_file():
                raise ValueError(f"{p} is not a file: move it away or choose another --out")
        if self.shards.exists() and (self.shards.is_symlink() or not self.shards.is_dir()):
            raise ValueError(f"{self.shards} is not the checkpoint's folder: move it away or choose another --out")
        if resume == "auto":
            # Continue what is there, or start where nothing is; a finished
            # run's results without their checkpoint are neither.
            self.resume = self.ckpt.exists()
            if not self.resume and self.summary.exists():
                raise ValueError(f"--resume auto: {self.out} holds a finished run's summary.json but no "
                                 f"ckpt.pt to continue from: choose another --out, or --overwrite")
            return
        # summary.json counts as much as ckpt.pt: a finished run whose
        # checkpoint was deleted to save space (compare.py does) still has a
        # log and results that a fresh run here would replace.
        for p in (self.ckpt, self.summary):
            if p.exists() and not (resume or overwrite):
                raise ValueError(f"{p} already exists: add --resume to continue that run, --overwrite to "
                                 f"start over, or choose another --out")

    def remove_stale(self):
        """What a killed run leaves: half-written temporary files and a new
        run's folder that never reached its first checkpoint, step folders
        that the index does not name (written before a kill stopped their
        index, or not yet removed after it). The lock is ours, so no live
        run is writing them."""
        for name in RUN_FILES:
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink()
        self.prune_step_folders()
        stage = self.out / STAGE
        if stage.is_dir() and not stage.is_symlink():
            shutil.rmtree(stage)
        elif stage.exists() or stage.is_symlink():
            stage.unlink()

    def finish_swap(self):
        """Move a committed new run's files over the old ones (see the class).
        Safe to repeat after a kill at any point: .swap/MOVES names what the
        new run brought, so a name missing from .swap was moved already (and
        is kept), while an old file the new run has no counterpart for yet
        (summary.json) is removed. The new step folder joins the old ones in
        ckpt/ (the names never collide), so until the new index replaces the
        old one, the old index still names a whole folder."""
        swap = self.out / SWAP
        if not swap.is_dir():
            return
        try:
            brought = json.loads((swap / MOVES).read_text())
        except (OSError, ValueError):
            brought = [n for n in RUN_FILES if (swap / n).exists()]   # a swap written by an older train.py
        for name in RUN_FILES:
            src, dst = swap / name, self.out / name
            if name == "ckpt" and src.is_dir():
                dst.mkdir(exist_ok=True)
                for folder in sorted(src.iterdir()):
                    os.replace(folder, dst / folder.name)
            elif src.exists():
                os.replace(src, dst)
            elif name not in brought and dst.is_file():
                dst.unlink()                   # the old run's: the new one has none yet
        self.prune_step_folders()
        shutil.rmtree(swap)

    def prune_step_folders(self):
        """Remove the step folders in ckpt/ that the index does not name:
        written before a kill stopped their index, or a replaced run's. With
        no readable index, nothing is removed."""
        if not self.shards.is_dir() or self.shards.is_symlink():
            return
        try:
            keep = open_checkpoint(self.ckpt)["folder"]
        except ValueError:
            return
        if keep.parent == self.shards:
            remove_folders_but(self.shards, keep.name)

    def target(self, name):
        """Where this run writes `name` now: OUT, or OUT/.next until its first checkpoint."""
        return (self.stage or self.out) / name

    def commit(self):
        """The new run's first checkpoint is on disk: it replaces the old run.
        (Collective: a failure stops every rank.)"""
        def swap():
            if self.stage:
                try:
                    brought = [n for n in RUN_FILES if (self.stage / n).exists()]
                    write_atomic(self.stage / MOVES, lambda f: f.write(json.dumps(brought).encode()))
                    os.replace(self.stage, self.out / SWAP)    # from here on the new run is the run
                    self.stage = None
                    self.finish_swap()                         # the log's open file moves with it
                except OSError as e:
                    raise cannot_write(self.out / SWAP, e) from None
        share_failure(self.proc, swap, f"into {self.out}")

    def open_log(self, upto_step, run_id):
        """Keep the log's records of this run up to the checkpoint's step
        (those after it were lost with the interruption and will be redone),
        rewritten atomically: a kill during the rewrite leaves the old log
        whole. A record of another run means the folder mixes two runs: that
        is refused rather than continued."""
        self.run_id = run_id
        if not self.proc.main:
            return []
        records = []
        if upto_step and self.log_path.exists():
            # Bytes, not text: a crash can leave a torn line or a block of
            # garbage at the end of the file, and one bad line must cost that
            # line, not the whole resume (json.loads of bad bytes raises a
            # ValueError, undecodable UTF-8 included).
            for line in self.log_path.read_bytes().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= upto_step:
                    if record.get("run") != run_id:
                        raise ValueError(f"--resume: {self.log_path} holds steps of another run (id "
                                         f"{record.get('run')}) than {self.ckpt} (id {run_id}): move the folder "
                                         f"away, or start over with --overwrite")
                    records.append(record)
        path = self.target("log.jsonl")
        write_atomic(path, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in records))
        self.logf = open(path, "a")
        return records

    def append(self, record):
        """One log line. A failed write is kept, not raised: raise_if_failed
        stops every rank with it at the end of the step."""
        if self.logf and not self.error:
            try:
                self.logf.write(finite_json({**record, "run": self.run_id}) + "\n")
                self.logf.flush()
            except OSError as e:
                self.error = ValueError(f"cannot write {self.log_path} ({e.strerror}); free space and use --resume")

    def raise_if_failed(self):
        """(Collective.) Raise, on every rank, a write that failed on rank 0."""
        def fail():
            if self.error:
                raise self.error
        share_failure(self.proc, fail, f"{self.log_path}")

    def summary_run_id(self):
        """The run id in summary.json, or None if it has none (or no summary)."""
        try:
            return json.loads(self.summary.read_bytes()).get("run")
        except (OSError, ValueError, AttributeError):
            return None

    def write_summary(self, summary):
        """(Collective: a full disk stops every rank with one line.)"""
        share_failure(self.proc, lambda: write_atomic(self.summary, lambda f: f.write(finite_json(summary).encode())),
                      f"{self.summary}")

    def close(self):
        """Release the folder. A new run that never reached its first
        checkpoint is removed: the old run stays as it was."""
        for f in (self.logf,):
            try:
                f and f.close()
            except OSError:                    # a full disk: its line was printed already
                pass
        if self.stage and self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)
        if self.lock:
            self.lock.close()
        self.logf = self.lock = self.stage = None


def open_run_dir(out, proc, resume, overwrite):
    """RunDir on rank 0, with its verdict shared: if rank 0 may not use the
    folder, every rank stops at once instead of training without it; and
    with --resume auto, every rank learns whether there is a run to continue."""
    error, run = None, None
    try:
        run = RunDir(out, proc, resume, overwrite)
    except ValueError as e:
        error = e
    if proc.agree(error is not None):
        raise error or ValueError(f"--out {out} cannot be used (rank 0 says why)")
    run.resume = proc.agree(run.resume)
    return run


# ----------------------------------------------------------------------------
# 3. Checkpoints.
#
# A checkpoint is a folder written by torch.distributed.checkpoint and a
# small index beside it:
#
#   OUT/ckpt/step_00000100/  every rank writes the experts it holds and their
#                            AdamW moments; what every rank holds (the
#                            replicated tensors) is written once
#   OUT/ckpt.pt              the index: step, config, run id, RNG, the
#                            optimizer's settings, the folder's name, a sha256
#                            of each file in it, and a checksum of itself
#
# No rank ever gathers another rank's experts. An expert tensor is handed
# over as a DTensor (this rank's rows of the whole tensor, sharded over ep,
# replicated over dp), so the files record which rows they hold, and a resume
# reshards: each rank keeps just the rows of the experts it holds in its own
# mesh, whatever mesh wrote them. (dcp reads a stored shard whole before it
# keeps the rows, so resuming from a checkpoint of fewer ranks costs, for a
# moment, one stored shard of one tensor more.)
#
# The order makes it kill-safe: the folder (under a name no other save uses)
# is complete before the index names it, and the previous folder is removed
# only after that, so a kill at any moment leaves an index naming a whole
# folder; RunDir's swap keeps that true when a new run replaces an old one.
# And only a finite state is ever written: NaN weights would replace the last
# good checkpoint, and every resume from it would fail again.

def step_folder(step):
    """A new step folder's name: the step, and a random tag, so that no two
    saves ever write into the same folder (a resumed run saving a step again,
    two runs swapping one folder for the other)."""
    return f"step_{step:08d}.{uuid.uuid4().hex[:8]}"


def shard_root(index):
    """Where the step folders of the index .../ckpt.pt live: .../ckpt/."""
    return Path(index).with_suffix("")


def as_global(name, t, mesh):
    """This rank's rows of an expert tensor as the whole tensor they belong to
    (a DTensor: Shard(0) over ep, Replicate over dp). Everything else, and
    everything on one process, stays a plain tensor, which the checkpoint
    takes to be held whole by every rank."""
    if mesh.grid is None or not is_expert_param(name) or not torch.is_tensor(t) or t.dim() == 0:
        return t
    return DTensor.from_local(t, mesh.grid, [Replicate(), Shard(0)], run_check=False)


def as_local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def checkpoint_state(model, opt, mesh):
    """What the folder holds: the model's state_dict, and the optimizer's
    state keyed by parameter name (its own numbering is by position: fine
    within one run, opaque in a file)."""
    names = param_names(model, opt)
    return {"model": {k: as_global(k, v, mesh) for k, v in model.state_dict().items()},
            "optimizer": {names[i]: {k: as_global(names[i], v, mesh) for k, v in s.items()}
                          for i, s in opt.state_dict()["state"].items()}}


def is_finite_state(model, opt, proc):
    """Are the parameters, the optimizer's moments and the strategy's state
    finite on every rank? (Collective.)"""
    tensors = list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values()
                                                   if torch.is_tensor(v)]
    ok = all(torch.isfinite(t).all().item() for t in tensors if t.is_floating_point())
    return not proc.agree(not ok)


def save_checkpoint(path, model, opt, step, meta, proc):
    """Check; write the step folder (every rank its part); write the index
    `path` naming it (rank 0); remove the previous folder. Collective: every
    rank calls it. Raises FloatingPointError, and writes nothing, if the
    state is not finite."""
    if not is_finite_state(model, opt, proc):
        raise FloatingPointError(f"the weights or optimizer state became NaN or infinite by step {step}; "
                                 f"{path} keeps the last good state. Try a lower --lr")
    # Rank 0's path (a new run writes into OUT/.next at first) and folder name.
    path, name = proc.share((Path(path), step_folder(step)))
    folder = shard_root(path) / name
    share_failure(proc, lambda: new_folder(folder, path), str(folder))
    written = write_shards(checkpoint_state(model, opt, proc.mesh), folder, path, proc)
    index = {"shards": f"{folder.parent.name}/{folder.name}", "files": hash_files(folder, shard_files(written), proc),
             "param_order": param_names(model, opt), "param_groups": opt.state_dict()["param_groups"],
             "step": step, "rng": torch.get_rng_state(), **meta}
    share_failure(proc, lambda: write_checkpoint(path, index), str(path))
    if proc.main:
        remove_folders_but(folder.parent, folder.name)


def new_folder(folder, index):
    try:
        folder.mkdir(parents=True)
    except OSError as e:
        raise cannot_write(index, e) from None


def remove_folders_but(root, keep):
    """Everything in `root` but `keep`: older step folders, and those of
    checkpoints that a kill stopped before their index was written. Best
    effort: what cannot be removed now, the next run's start removes."""
    try:
        for p in root.iterdir():
            if p.name != keep:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    except OSError:
        pass


def first_failure(e, proc):
    """The error of the lowest failing rank in a CheckpointException (dcp
    gathers every rank's, and raises the same on all of them), and which
    rank it was, as words to put before a message. Out of memory stays
    itself, for cli's line."""
    rank, (error, _) = min(e.failures.items())
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        raise MemoryError(f"out of memory on rank {rank} while reading or writing a checkpoint") from None
    return error, (f"rank {rank}: " if proc.world_size > 1 else "")


def write_shards(state, folder, index, proc):
    """dcp.save: every rank writes its part of `state` into `folder` (and a
    tensor that several ranks hold, only one of them). A write that fails on
    any rank fails on all of them, as one line. Returns the metadata of the
    whole folder, on every rank."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=proc.world_size == 1)
    except CheckpointException as e:
        if proc.main:
            shutil.rmtree(folder, ignore_errors=True)    # a half-written folder is of no use
        error, who = first_failure(e, proc)
        raise ValueError(f"{who}{cannot_write(index, error)}") from None


def shard_files(meta):
    """The files a step folder consists of, from its metadata."""
    return sorted({s.relative_path for s in meta.storage_data.values()}) + [".metadata"]


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(folder, names, proc):
    """{name: sha256} of the files `names` in `folder`, on every rank. The
    reading is shared out (rank r hashes every W-th file), so no rank reads
    the whole checkpoint. A file that cannot be read is named, on every rank.
    (Collective.)"""
    mine, error = {}, None
    for name in names[proc.rank::proc.world_size]:
        try:
            mine[name] = file_sha256(folder / name)
        except OSError as e:
            error = f"{folder / name} cannot be read ({e.strerror})"
            break
    every = [(mine, error)]
    if proc.world_size > 1:
        every = [None] * proc.world_size
        dist.all_gather_object(every, (mine, error))
    errors = [e for _, e in every if e]
    if errors:
        raise ValueError(errors[0])
    return {name: h for m, _ in every for name, h in m.items()}


def verify_shards(ckpt, proc):
    """Refuse a step folder whose files are not those the index names, byte
    for byte (a flipped bit in a weight loads without complaint otherwise).
    (Collective.)"""
    folder, stored = ckpt["folder"], ckpt["files"]
    found = hash_files(folder, sorted(stored), proc)
    bad = [name for name in sorted(stored) if found[name] != stored[name]]
    if bad:
        raise ValueError(f"{folder / bad[0]} is damaged (its sha256 does not match what was written): restore "
                         f"it from a copy, or start over with --overwrite")


def checksum(obj):
    """sha256 over everything an index holds: every tensor's dtype, shape and
    bytes, every other value's repr, in a fixed order."""
    h = hashlib.sha256()

    def walk(v):
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, dict):
            for k in sorted(v, key=repr):
                h.update(f"key {k!r}".encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"{type(v).__name__} {len(v)}".encode())
            for x in v:
                walk(x)
        else:
            h.update(f"value {v!r}".encode())
    walk(obj)
    return h.hexdigest()


def write_checkpoint(path, index):
    """The index, with the checksum of its contents inside it."""
    whole = dict(index, checksum=checksum(index))
    write_atomic(path, lambda f: torch.save(whole, f))


def verify_checkpoint(ckpt, path):
    """Refuse an index whose contents are not what was written."""
    stored = ckpt.pop("checksum", None)
    if stored is None:
        raise ValueError(f"{path} has no checksum: it was written by an older train.py (or not by it) and "
                         f"cannot be trusted; start over with --overwrite or point --out elsewhere")
    if checksum(ckpt) != stored:
        raise ValueError(f"{path} is damaged (its checksum does not match what was written): restore it "
                         f"from a copy, or start over with --overwrite")
    return ckpt


def param_names(model, opt):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


CHECKPOINT_KEYS = ("shards", "files", "param_order", "param_groups", "step", "rng", "config")


def open_checkpoint(path):
    """The index at `path` (a ckpt.pt, or a run folder holding one), checked
    to be one train.py wrote and whole; "folder" is added: where its step
    folder is. One line for anything else."""
    path = Path(path) / "ckpt.pt" if os.path.isdir(path) else Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}; run without --resume first, or pass a ckpt.pt written "
                         f"by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)   # our own files: they hold args
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or point "
                         f"--out elsewhere") from None
    # torch.load reads any pickle: a saved tensor, someone else's state_dict,
    # or the single-file checkpoint of an older train.py loads fine and would
    # fail later with a KeyError far from the cause.
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["all"]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint of this version (missing {', '.join(missing)}); "
                         f"delete it or point --out elsewhere")
    ckpt = verify_checkpoint(ckpt, path)
    ckpt["folder"] = path.parent / ckpt["shards"]
    return ckpt


def read_checkpoint(path):
    try:
        return open_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"--resume: {e}") from None


def read_metadata(folder, proc):
    """The step folder's metadata (every tensor's whole shape, and which rows
    each file holds), read by rank 0 and shared, so that every rank decides
    alike. (Collective.)"""
    meta = error = None
    if proc.main:
        if not folder.is_dir():
            error = f"{folder}, the folder its index names, is missing: restore it, or start over with --overwrite"
        else:
            try:
                meta = dcp.FileSystemReader(folder).read_metadata()
            except Exception as e:  # a missing, truncated or foreign .metadata
                error = (f"{folder} has no readable metadata ({type(e).__name__}): restore it, or start over "
                         f"with --overwrite")
    meta, error = proc.share((meta, error))
    if error:
        raise ValueError(error)
    return meta.state_dict_metadata


def check_fits(meta, state, what):
    """The step folder holds exactly the tensors `state` has, of the same
    whole shapes: dcp would skip a tensor the model does not have, without
    a word."""
    saved = {k: tuple(m.size) for k, m in meta.items() if k.startswith("model.")}
    wanted = {f"model.{k}": tuple(v.shape) for k, v in state.items()}
    for k in sorted(set(saved) | set(wanted)):
        if saved.get(k) != wanted.get(k):
            raise ValueError(f"{what} does not fit this model ({k[len('model.'):]}: "
                             f"{saved.get(k, 'absent')} in the checkpoint, {wanted.get(k, 'absent')} here)")


def optimizer_targets(model, opt, meta, mesh):
    """Empty tensors, of this rank's shapes, for the optimizer state the
    folder holds (a fresh AdamW has none yet to load into)."""
    params = dict(model.named_parameters())
    targets = {}
    for name in param_names(model, opt):
        head, p = f"optimizer.{name}.", params[name]
        for key, m in meta.items():
            if key.startswith(head) and "." not in key[len(head):]:
                # A moment has the parameter's whole shape (this rank keeps
                # its rows of it); anything else (AdamW's step) is stored whole.
                if tuple(m.size) == tuple(as_global(name, p.detach(), mesh).shape):
                    t = as_global(name, torch.empty_like(p, dtype=m.properties.dtype), mesh)
                else:
                    t = torch.empty(m.size, dtype=m.properties.dtype)
                targets.setdefault(name, {})[key[len(head):]] = t
    return targets


def read_shards(state, folder, proc):
    """dcp.load into `state`, in place: each rank reads the rows it holds.
    A read that fails on any rank fails on all of them, as one line."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=proc.world_size == 1)
    except CheckpointException as e:
        error, who = first_failure(e, proc)
        raise ValueError(f"{who}{folder} cannot be read ({getattr(error, 'strerror', None) or first_line(error)}): "
                         f"restore it, or start over with --overwrite") from None


def load_checkpoint(ckpt, model, opt, proc):
    """Restore model (strict: a renamed or missing tensor is an error, never
    a silently fresh one), optimizer and RNG from a read index. (Collective.)"""
    mesh, folder = proc.mesh, ckpt["folder"]
    try:
        meta = read_metadata(folder, proc)
        verify_shards(ckpt, proc)
        if ckpt["param_order"] != param_names(model, opt):
            raise ValueError(f"{folder} does not fit this model (its parameters differ)")
        state = {"model": {k: as_global(k, v, mesh) for k, v in model.state_dict().items()}}
        check_fits(meta, state["model"], str(folder))
        state["optimizer"] = optimizer_targets(model, opt, meta, mesh)
        read_shards(state, folder, proc)              # the model's own tensors are filled in place
    except ValueError as e:
        raise ValueError(f"--resume: {e}") from None
    index = {n: i for i, n in enumerate(ckpt["param_order"])}
    opt.load_state_dict({"state": {index[n]: {k: as_local(v) for k, v in s.items()}
                                   for n, s in state["optimizer"].items()},
                         "param_groups": ckpt["param_groups"]})
    torch.set_rng_state(ckpt["rng"])


def checkpoint_tensors(path):
    """Every tensor of a checkpoint, whole, on one process: {"model": ...,
    "optimizer": {name: {"exp_avg": ...}}}, for looking inside one. (PyTorch's
    own converter, which also runs from the shell: python -m
    torch.distributed.checkpoint.format_utils dcp_to_torch FOLDER FILE.)"""
    ckpt, proc = open_checkpoint(path), Proc()
    read_metadata(ckpt["folder"], proc)
    verify_shards(ckpt, proc)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_to_torch_save(ckpt["folder"], Path(tmp) / "whole.pt")
        except (CheckpointException, OSError) as e:
            raise ValueError(f"{ckpt['folder']} cannot be read whole here ({type(e).__name__})") from None
        return torch.load(Path(tmp) / "whole.pt", weights_only=False)


def load_model(path):
    """The model of a checkpoint, whole (every expert) on one CPU process, in
    evaluation mode, and the checkpoint's index. `path` may be a ckpt.pt or a
    run folder. A checkpoint that does not fit this code exactly -- a config
    field it does not know, a missing or misshapen tensor -- is refused with
    one line rather than loaded by guess. Reads the model's tensors only,
    not the optimizer's moments."""
    from balancers import BalanceConfig
    from moe import GPT, GPTConfig
    ckpt, proc = open_checkpoint(path), Proc()
    meta = read_metadata(ckpt["folder"], proc)
    verify_shards(ckpt, proc)
    try:
        c = ckpt["config"]
        model = GPT(GPTConfig(**{**c, "balance": BalanceConfig(**c["balance"])}))
    except (TypeError, KeyError, ValueError) as e:
        why = " ".join(str(e).split())[:160]
        raise ValueError(f"{ckpt['folder']} does not fit this version of moe.py ({why})") from None
    state = {"model": model.state_dict()}
    check_fits(meta, state["model"], f"{ckpt['folder']} (this version of moe.py)")
    read_shards(state, ckpt["folder"], proc)
    return model.eval(), ckpt


# ----------------------------------------------------------------------------
# 4. Stopping cleanly.

class StopFlag:
    """SIGTERM (a scheduler, torchrun being stopped) or Ctrl-C sets a flag;
    the loop finishes the step, saves a checkpoint and exits, every rank at
    the same step (Proc.agree). A second Ctrl-C leaves at once."""

    def __init__(self):
        self.raised = False
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------
# 5. The command-line wrapper.

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (not the whole usage) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def preset_help(presets, key):
    """A preset-controlled flag's defaults, for --help: "tiny 2; default 4"."""
    return "; ".join(f"{name} {p[key]}" for name, p in presets.items())


def knob_help(name):
    """A strategy knob's default as each registered strategy sets it, for --help."""
    values = {b: c.defaults[name] for b, c in BALANCERS.items() if name in c.defaults}
    if len({str(v) for v in values.values()}) == 1:
        return f"{next(iter(values.values()))}, read by {', '.join(values)}"
    return "; ".join(f"{b} {v}" for b, v in values.items())


def check_memory(cfg, local_seqs, world_size, device=None):
    """Refuse, with the flag to lower, a run that cannot fit: building it
    would otherwise thrash or be killed minutes later. A rough count in
    bytes: fp32 weights, gradients and two AdamW moments for this rank's
    share, and ~40 activations of width d_model (plus the logits) per token
    and layer kept for the backward pass."""
    E_local = cfg.n_experts // world_size
    params = cfg.n_layers * (4 * cfg.d_model ** 2 + (E_local + cfg.shared_experts) * 3 * cfg.d_model * cfg.d_expert) \
        + 2 * cfg.vocab_size * cfg.d_model
    tokens = local_seqs * cfg.seq_len
    need = 16 * params + 4 * tokens * (cfg.n_layers * (40 * cfg.d_model + 6 * cfg.top_k * cfg.d_expert)
                                       + 3 * cfg.vocab_size)
    if device is not None and device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "the GPU"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine"
    if need > 0.8 * have:
        biggest = "--n-experts or --d-expert" if 16 * params > need / 2 else \
            "--batch-size (or raise --grad-accum) or --seq-len"
        raise ValueError(f"this run needs about {need / 2**30:.0f} GiB of memory, {where} has "
                         f"{have / 2**30:.0f} GiB: lower {biggest}")


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def lost_peer(e):
    """Is this the error of a collective whose peer is gone (killed, crashed,
    its machine lost)? gloo and NCCL raise a plain RuntimeError for it."""
    text = str(e)
    return dist.is_initialized() and (isinstance(e, dist.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Socket Timeout")))


def lost_peer_line(e):
    """The survivor's one line: who was lost, and how to go on."""
    rank, world = dist.get_rank(), dist.get_world_size()
    who = f"rank {1 - rank}" if world == 2 else "another rank"
    return (f"rank {rank} of {world} lost contact with {who}, which stopped or was killed ({first_line(e)[:120]}); "
            f"the last checkpoint is kept: run the same command again with --resume (under torchrun, "
            f"--max-restarts N with --resume auto does that by itself)")


def prints_errors():
    """Does this process print the run's error line? Each machine's first
    process (LOCAL_RANK 0) does; so does any process whose environment is
    not a valid rank's, since that mistake is its own."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        return True
    return local == 0 or not 0 <= rank < world


def cli(entry):
    """Run entry() as a program. User mistakes (ValueError) become one line on
    stderr and exit code 2; a run that diverged (FloatingPointError) one line
    and exit 1; running out of memory one line naming what to lower; a peer
    process that died one line from each survivor, exit 1."""
    code = 0
    try:
        code = entry()
        if dist.is_initialized():
            dist.barrier()          # tear down together, once every rank is done
    except (ValueError, FloatingPointError, MemoryError, RuntimeError) as e:
        out_of_memory = any(s in str(e).lower() for s in OUT_OF_MEMORY)
        if isinstance(e, RuntimeError) and not out_of_memory and lost_peer(e):
            print(f"error: {lost_peer_line(e)}", file=sys.stderr, flush=True)
            code = 1
        else:
            if isinstance(e, RuntimeError) and not out_of_memory:
                raise
            if isinstance(e, (MemoryError, RuntimeError)):
                e = ValueError("out of memory: lower --batch-size (or raise --grad-accum), --n-experts, "
                               "--d-model or --d-expert")
            # Every rank sees the same flags and fails the same way: one line
            # per machine is enough (its first process prints it; on several
            # nodes each node's user sees it in their own log).
            if prints_errors():
                print(f"error: {e}", file=sys.stderr, flush=True)
            code = 2 if isinstance(e, ValueError) else 1
    finally:
        distributed = dist.is_initialized()
        if distributed:
            try:
                dist.destroy_process_group()
            except RuntimeError:            # a dead peer's group cannot always be torn down
                pass
    if distributed:
        leave(code)
    sys.exit(code)


def leave(code):
    """End a process that used torch.distributed, skipping the interpreter's
    teardown. Now and then (a few runs in a hundred here) a gloo process
    aborts in a C++ destructor after all Python code has run ("terminate
    called without an active exception"), which would turn a finished run
    into a failure. Everything this project writes is closed or flushed by
    then, so there is nothing left for the teardown to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------
# 6. Starting local processes (tests, bench.py).

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
