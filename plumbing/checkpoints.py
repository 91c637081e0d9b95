"""
plumbing/checkpoints.py -- torch.distributed.checkpoint's per-rank shards
(each rank writes only its own experts, and keeps only their rows when it
reads), resharded so any number of processes and any --ep-size can resume;
written only from a finite state, kill-safe, with checksums verified before
anything is loaded.
"""

import hashlib
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor, Replicate, Shard

import balancers
import moe

from .files import cannot_write, first_line, share_failure, write_atomic
from .process import Proc


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
    if mesh.grid is None or not moe.is_expert_param(name) or not torch.is_tensor(t) or t.dim() == 0:
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
    return not proc.any_rank(not ok)


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
    # dcp catches BaseException on every rank: a second Ctrl-C during a save
    # must stay an interrupt, not become a write that failed.
    if isinstance(error, KeyboardInterrupt):
        raise error
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
    path = Path(path)
    if path.is_dir() and not (path / "ckpt.pt").exists() and (path / "latest").is_dir():
        path = path / "latest"          # runs/BALANCER: the newest of the runs made without --out
    path = path / "ckpt.pt" if path.is_dir() else path
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
    ckpt, proc = open_checkpoint(path), Proc()
    strategy, imports = ckpt["config"].get("balancer"), ckpt.get("args", {}).get("imports", [])
    if strategy not in balancers.BALANCERS:
        # A strategy of the user's own: import the file the run was trained with.
        missing = [f for f in imports if f.endswith(".py") and not os.path.isfile(f)]
        if not imports or missing:
            raise ValueError(f"{path} was trained with the strategy {strategy!r}, which is not registered here: "
                             f"pass --import with the file that registers it"
                             + (f" (the run imported {', '.join(imports)})" if imports else ""))
        balancers.import_strategies(imports)
    meta = read_metadata(ckpt["folder"], proc)
    verify_shards(ckpt, proc)
    try:
        c = ckpt["config"]
        model = moe.GPT(moe.GPTConfig(**c))
    except (TypeError, KeyError, ValueError) as e:
        why = " ".join(str(e).split())[:160]
        raise ValueError(f"{ckpt['folder']} does not fit this version of moe.py and balancers.py ({why})") from None
    state = {"model": model.state_dict()}
    check_fits(meta, state["model"], f"{ckpt['folder']} (this version of moe.py)")
    read_shards(state, ckpt["folder"], proc)
    return model.eval(), ckpt
