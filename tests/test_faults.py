"""
Faults: every way a user's input or the machine can still break a run, and
the proof that none of them loses data.

1. PROBES, a table of bad inputs, each run through the real command line
   (plumbing.cli(train.main), as `python train.py ...` runs it) against a
   copy of a finished run: the exit code, exactly one line on stderr that
   names the flag or the problem, no traceback, no hang, and every file
   already in --out byte for byte as it was.
2. Named tests for the ways a run used to lose data -- a resume of a
   finished run, a kill during the log rewrite, two runs on one folder, a
   full disk, a NaN in the log -- and for the smaller promises (wall time,
   checkpoint cadence, --help, the final line, dropped duplicates).
   The fifth, "a NaN step never replaces the last good checkpoint", is
   test_a_nan_step_never_replaces_the_last_good_checkpoint in test_train.py.
3. Under torchrun, a bad flag stops both ranks with one line.
4. lab.bench, lab.compare and exercises.run: the same standard, as a table.
5. The second round, named: an --overwrite killed at random moments, an
   interrupted swap, stale files, output flags on resume, changed data, a
   real full disk (tmpfs, as root), ranks or nodes started differently, and
   torchrun --max-restarts with --resume auto after a killed rank.

Everything runs the tiny preset for a few steps and in this process, except
where a real process is the point (a lock held by a live run, signals,
torchrun). docs/reliability.md lists the guarantees and the test of each.
"""

import errno
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint

import data
import plumbing
import train
from lab import bench, compare

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny"]


def run_cli(monkeypatch, capsys, *argv):
    """`python train.py ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()                                   # drop what came before
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        plumbing.cli(train.main)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def snapshot(folder):
    """Every file and folder under `folder`: path -> sha256 of its bytes (or
    "folder"). Two equal snapshots mean nothing was written, created,
    truncated or removed."""
    state = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = f"link to {os.readlink(path)}"
        else:
            state[key] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def log_steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def error_lines(err):
    """The lines of stderr that are not the progress bar (tqdm also writes there)."""
    return [line for line in err.splitlines() if "error" in line or "Traceback" in line]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished two-step tiny run: ckpt.pt, log.jsonl, summary.json, .lock.
    Every probe gets a copy of it as its --out."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """--data folders that are wrong in one way each."""
    root = tmp_path_factory.mktemp("data")
    (root / "empty").mkdir()                                  # no files at all
    (root / "hollow" / "a").mkdir(parents=True)               # domain b has no bytes
    (root / "hollow" / "a" / "x.txt").write_text("hello world " * 2000)
    (root / "hollow" / "b").mkdir()
    (root / "hollow" / "b" / "y.txt").write_text("")
    (root / "short" / "a").mkdir(parents=True)                # far too little text for seq_len 64
    (root / "short" / "a" / "x.txt").write_text("hi\n")
    (root / "short" / "b").mkdir()
    (root / "short" / "b" / "y.txt").write_text("hello\n")
    (root / "file.txt").write_text("a file, not a folder\n")
    text = "the quick brown fox jumps over the lazy dog\n" * 500
    for name in ("dangling", "fifo", "sparse", "locked", "secret", "odd", "good"):
        (root / name / "a").mkdir(parents=True)
        (root / name / "a" / "x.txt").write_text(text)
        (root / name / "b").mkdir()
        (root / name / "b" / "y.txt").write_text(text.upper())
    (root / "dangling" / "b" / "z.txt").symlink_to(root / "nowhere.txt")  # a link whose file was removed
    os.mkfifo(root / "fifo" / "b" / "pipe")                                # reading it would wait forever
    with open(root / "sparse" / "b" / "huge.txt", "wb") as f:              # 64 GB that take no disk
        f.truncate(64 * 2**30)
    (root / "locked" / "b" / "locked").mkdir()                             # a folder that cannot be listed
    (root / "locked" / "b" / "locked" / "z.txt").write_text(text)
    (root / "secret" / "b" / "secret.txt").write_text(text)                 # a file that cannot be read
    (root / "hidden" / ".cache").mkdir(parents=True)                        # only hidden files
    (root / "hidden" / ".cache" / "x.txt").write_text(text)
    (root / "hidden" / ".notes.txt").write_text(text)
    (root / "swapfiles" / "a").mkdir(parents=True)                          # a domain of editor swap files
    (root / "swapfiles" / "a" / "x.txt").write_text(text)
    (root / "swapfiles" / "b").mkdir()
    (root / "swapfiles" / "b" / ".y.txt.swp").write_text(text)
    (root / "stems").mkdir()                                                # notes.txt and notes.md: one name
    (root / "stems" / "notes.txt").write_text(text)
    (root / "stems" / "notes.md").write_text(text.upper())
    odd = os.path.join(os.fsencode(str(root / "odd")), b"caf\xe9\n")      # Latin-1 and a newline in a name
    os.mkdir(odd)
    with open(os.path.join(odd, b"x.txt"), "wb") as f:
        f.write(b"hi\n")
    return root


# ----------------------------------------------------------------------------
# 1. The probe table.
#
# Set-ups change the copied --out (or the machine) before the probe; the
# snapshot is taken after them, so "untouched" means "as the set-up left it".

def ckpt_is_a_folder(out, monkeypatch):
    (out / "ckpt.pt").unlink()
    (out / "ckpt.pt").mkdir()


def log_is_a_folder(out, monkeypatch):
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir()


def summary_is_a_folder(out, monkeypatch):
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()


def lock_is_a_folder(out, monkeypatch):
    (out / ".lock").unlink()
    (out / ".lock").mkdir()


def checkpoint_deleted(out, monkeypatch):
    """What lab/compare.py leaves: a finished run's log and summary, no ckpt.pt."""
    (out / "ckpt.pt").unlink()


def garbage_checkpoint(out, monkeypatch):
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")


def truncated_checkpoint(out, monkeypatch):
    whole = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(whole[:len(whole) // 2])


def empty_checkpoint(out, monkeypatch):
    (out / "ckpt.pt").write_bytes(b"")


def tensor_checkpoint(out, monkeypatch):
    torch.save(torch.zeros(3), out / "ckpt.pt")


def index_without_file_list(out, monkeypatch):
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    del ckpt["files"]
    torch.save(ckpt, out / "ckpt.pt")


def old_single_file_checkpoint(out, monkeypatch):
    """What train.py wrote before checkpoints were sharded: one file with every tensor inside."""
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    for key in ("shards", "files", "param_groups"):
        del ckpt[key]
    ckpt.update(plumbing.checkpoint_tensors(out))
    ckpt["checksum"] = plumbing.checksum({k: v for k, v in ckpt.items() if k != "checksum"})
    shutil.rmtree(out / "ckpt")
    torch.save(ckpt, out / "ckpt.pt")


def step_folder_deleted(out, monkeypatch):
    shutil.rmtree(out / "ckpt")


def shard_file_deleted(out, monkeypatch):
    next((out / "ckpt").glob("*/__0_*.distcp")).unlink()


def metadata_garbled(out, monkeypatch):
    """The step folder's .metadata (which rows of which tensor each file holds) overwritten."""
    next((out / "ckpt").glob("*/.metadata")).write_bytes(b"garbage")


def shard_folder_is_a_file(out, monkeypatch):
    shutil.rmtree(out / "ckpt")
    (out / "ckpt").write_text("not a folder\n")


def no_cuda(out, monkeypatch):
    """This PyTorch sees no GPU, whatever machine the tests run on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def machine_with_16gib(out, monkeypatch):
    """The memory check compares with the machine's RAM: pin it, so that the
    probes refuse the same sizes on a laptop and on a big server."""
    real = os.sysconf
    pages = 16 * 2**30 // real("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: pages if name == "SC_PHYS_PAGES" else real(name))


def allocation_fails(out, monkeypatch):
    """The allocator gives up while the model is built (the message is PyTorch's own)."""
    def build(args, proc):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(train, "build", build)


# (flags, set-up, exit code, a fragment the one line must contain). Flags come
# after `--preset tiny --steps 2 --out {root}/run`; {root} is the probe's
# folder, {data} the folder of bad --data folders above.
PROBES = [
    # numbers, checked in one place (plumbing.check_args) before anything is built
    ("--steps 0", None, 2, "--steps"),
    ("--steps -1", None, 2, "--steps"),
    ("--lr 0", None, 2, "--lr"),
    ("--lr -1", None, 2, "--lr"),
    ("--lr nan", None, 2, "--lr"),
    ("--lr inf", None, 2, "--lr"),
    ("--warmup -1", None, 2, "--warmup"),
    ("--seed -1", None, 2, "--seed"),
    ("--seed 18446744073709551616", None, 2, "--seed"),        # one past torch's largest seed
    ("--seq-len 0", None, 2, "--seq-len"),
    ("--top-k 0", None, 2, "--top-k"),
    ("--top-k 9", None, 2, "top_k"),                            # more than the 8 experts
    ("--n-heads 3", None, 2, "n_heads"),                        # does not divide d_model 64
    ("--n-layers 0", None, 2, "--n-layers"),
    ("--d-model 0", None, 2, "--d-model"),
    ("--n-experts 0", None, 2, "--n-experts"),
    ("--d-expert 0", None, 2, "--d-expert"),
    ("--shared-experts -1", None, 2, "--shared-experts"),
    ("--stop-at 0", None, 2, "--stop-at"),
    ("--grad-accum 0", None, 2, "--grad-accum"),
    ("--batch-size 0", None, 2, "--batch-size"),
    ("--batch-size 8 --grad-accum 3", None, 2, "--batch-size"),
    ("--domain-block 3", None, 2, "--domain-block"),
    ("--grad-clip -1", None, 2, "--grad-clip"),
    ("--grad-clip 0", None, 2, "--grad-clip"),
    ("--weight-decay nan", None, 2, "--weight-decay"),
    ("--eval-every -1", None, 2, "--eval-every"),
    ("--log-every 0", None, 2, "--log-every"),
    ("--ckpt-every 0", None, 2, "--ckpt-every"),
    ("--val-seqs 0", None, 2, "--val-seqs"),
    # strategy knobs: ranges from BalanceConfig, checked by Balancer.check
    ("--balancer aux --balance-seqs 0", None, 2, "--balance-seqs"),
    ("--balancer aux --balance-seqs 3", None, 2, "--balance-seqs"),     # does not divide 8
    ("--balancer expert_choice --route-seqs 0", None, 2, "--route-seqs"),
    ("--balancer expert_choice --capacity-factor inf", None, 2, "--capacity-factor"),
    ("--balancer expert_choice --capacity-factor nan", None, 2, "--capacity-factor"),
    ("--balancer expert_choice --capacity-factor 0", None, 2, "--capacity-factor"),
    ("--balancer expert_choice --capacity-factor -1", None, 2, "--capacity-factor"),
    ("--bias-rate nan", None, 2, "--bias-rate"),
    ("--bias-rate -1", None, 2, "--bias-rate"),
    ("--bias-rate 1e30", None, 2, "--bias-rate"),
    ("--balancer aux --alpha -100", None, 2, "--alpha"),
    ("--balancer aux --alpha nan", None, 2, "--alpha"),
    ("--z-loss inf", None, 2, "--z-loss"),
    # a knob the strategy does not read is an error, not silently ignored
    ("--balance-seqs 0", None, 2, "--balance-seqs does not apply to lossfree"),
    ("--route-seqs 0", None, 2, "--route-seqs does not apply to lossfree"),
    ("--alpha 0.1", None, 2, "--alpha does not apply to lossfree"),
    ("--balancer aux --capacity-factor 1", None, 2, "--capacity-factor does not apply to aux"),
    # argparse: one line, not the whole usage
    ("--gate relu", None, 2, "--gate"),
    ("--bias-update x", None, 2, "--bias-update"),
    ("--balancer nope", None, 2, "--balancer"),
    ("--device foo", None, 2, "--device"),
    ("--steps 1e3", None, 2, "--steps"),
    ("--no-such-flag", None, 2, "--no-such-flag"),
    ("--resume --overwrite", None, 2, "not allowed with"),
    ("--device cuda", no_cuda, 2, "--device cuda"),
    # sizes that cannot fit: refused at once, not after building for minutes
    ("--batch-size 100000000", machine_with_16gib, 2, "--batch-size"),
    ("--batch-size 100000", machine_with_16gib, 2, "--batch-size"),
    ("--n-experts 1000000", machine_with_16gib, 2, "--n-experts"),
    ("--seq-len 10000000", machine_with_16gib, 2, "--seq-len"),
    ("--resume --steps 4", allocation_fails, 2, "out of memory"),
    # the output folder
    ("", None, 2, "ckpt.pt already exists"),
    ("", checkpoint_deleted, 2, "summary.json already exists"),
    ("--resume", ckpt_is_a_folder, 2, "ckpt.pt is not a file"),
    ("--overwrite", ckpt_is_a_folder, 2, "ckpt.pt is not a file"),
    ("--resume --steps 4", log_is_a_folder, 2, "log.jsonl is not a file"),
    ("--resume --steps 4", summary_is_a_folder, 2, "summary.json is not a file"),
    ("--resume --steps 4", lock_is_a_folder, 2, "cannot be written"),
    ("--out {root}/afile", None, 2, "cannot be written"),
    ("--out {root}/afile/sub", None, 2, "cannot be written"),
    # --resume from what is not a usable checkpoint
    ("--resume --steps 4", checkpoint_deleted, 2, "no checkpoint"),
    ("--resume --steps 4", garbage_checkpoint, 2, "not a readable checkpoint"),
    ("--resume --steps 4", truncated_checkpoint, 2, "not a readable checkpoint"),
    ("--resume --steps 4", empty_checkpoint, 2, "not a readable checkpoint"),
    ("--resume --steps 4", tensor_checkpoint, 2, "not a train.py checkpoint"),
    ("--resume --steps 4", index_without_file_list, 2, "not a train.py checkpoint"),
    ("--resume --steps 4", old_single_file_checkpoint, 2, "not a train.py checkpoint of this version"),
    ("--resume --steps 4", step_folder_deleted, 2, "is missing"),
    ("--resume --steps 4", shard_file_deleted, 2, "cannot be read"),
    ("--resume --steps 4", metadata_garbled, 2, "no readable metadata"),
    ("--resume --steps 4", shard_folder_is_a_file, 2, "is not the checkpoint's folder"),
    ("--overwrite", shard_folder_is_a_file, 2, "is not the checkpoint's folder"),
    ("--resume --steps 4 --d-model 32", None, 2, "different model"),
    ("--resume --steps 4 --balancer aux", None, 2, "different model"),
    ("--resume --steps 4 --bias-rate 0.01", None, 2, "different model"),
    # --data; with --overwrite, so that a mistake there must not cost the old run
    ("--overwrite --data {data}/missing", None, 2, "does not exist"),
    ("--overwrite --data {data}/file.txt", None, 2, "not a folder"),
    ("--overwrite --data {data}/empty", None, 2, "contains no files"),
    ("--overwrite --data {data}/hollow", None, 2, "domain 'b'"),
    ("--overwrite --data {data}/short", None, 2, "too short"),
]


# Second round: each of these failed (a traceback, a wrong exit code, a
# silent wrong answer, or lost data) before the fix it names.

def edit_checkpoint(out, change, reseal=False):
    """Change a saved checkpoint; reseal: with a checksum that fits again
    (what an older train.py, or someone else's tool, would have written)."""
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    change(ckpt)
    if reseal:
        ckpt["checksum"] = plumbing.checksum({k: v for k, v in ckpt.items() if k != "checksum"})
    torch.save(ckpt, out / "ckpt.pt")


def flipped_byte_in_a_weight(out, monkeypatch):
    """One bit in the middle of the step folder's largest file, a weight's
    bytes: dcp.load would read the damaged weight happily."""
    path = max((out / "ckpt").glob("*/*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def flipped_byte_in_the_index(out, monkeypatch):
    """One bit of the index's largest tensor (the RNG state), inside the zip:
    torch.load does not check the zip's CRC and reads it happily."""
    path = out / "ckpt.pt"
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def checkpoint_without_checksum(out, monkeypatch):
    edit_checkpoint(out, lambda c: c.pop("checksum"))


def step_edited_by_hand(out, monkeypatch):
    edit_checkpoint(out, lambda c: c.update(step=1))


def weight_edited_by_hand(out, monkeypatch):
    """The step folder rewritten by another tool, with one weight changed:
    a whole, readable checkpoint, but not the one the index names."""
    whole = plumbing.checkpoint_tensors(out)
    next(iter(whole["model"].values())).add_(1)
    folder = plumbing.read_checkpoint(out / "ckpt.pt")["folder"]
    shutil.rmtree(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        torch.distributed.checkpoint.save(whole, checkpoint_id=folder, no_dist=True)


def checkpoint_of_an_older_train_py(out, monkeypatch):
    edit_checkpoint(out, lambda c: (c.pop("run_id"), c.pop("trajectory")), reseal=True)


def classmates_checkpoint(out, monkeypatch):
    """A whole, valid checkpoint of another seed copied over this one."""
    edit_checkpoint(out, lambda c: c["trajectory"].update({"--seed": 1}), reseal=True)


def log_of_another_run(out, monkeypatch):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (out / "log.jsonl").write_text("".join(json.dumps({**r, "run": "0123456789ab"}) + "\n" for r in lines))


def step_fails(error):
    def setup(out, monkeypatch):
        def fail(*a, **k):
            raise error
        monkeypatch.setattr(train, "train_step", fail)
    setup.__name__ = f"step_raises_{type(error).__name__}"
    return setup


allocation_fails_in_a_step = step_fails(RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "68719476736 bytes. Error code 12 (Cannot allocate memory)"))
exercise_stub_raises = step_fails(ValueError("exercise 1: write MultBias.route first (or train the reference "
                                             "solution: EXERCISES_FROM=solutions)"))


def environment(**env):
    def setup(out, monkeypatch):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    setup.__name__ = "env_" + "_".join(f"{k}={v}" for k, v in env.items())
    return setup


LISTENING = []          # sockets kept open for the length of the tests


def busy_master_port(out, monkeypatch):
    """MASTER_PORT set by hand to a port another program listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    LISTENING.append(s)
    for k, v in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1])).items():
        monkeypatch.setenv(k, v)


def locked_folder(out, monkeypatch):
    """A subfolder that cannot be listed (chmod 000 by a non-root user; the
    kernel's answer is faked, since root may list anything)."""
    real = os.walk

    def walk(top, onerror=None, **k):
        for here, dirs, files in real(top, onerror=onerror, **k):
            if Path(here).name == "locked":
                onerror(PermissionError(errno.EACCES, os.strerror(errno.EACCES), here))
                continue
            yield here, dirs, files
    monkeypatch.setattr(os, "walk", walk)


def secret_file(out, monkeypatch):
    """A file that cannot be read (chmod 000 by another user; faked for root)."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def checkpoint_link_to_nowhere(out, monkeypatch):
    """ckpt.pt a symlink into a folder someone has since cleaned up."""
    (out / "ckpt.pt").unlink()
    (out / "ckpt.pt").symlink_to(out.parent / "cleaned-up" / "ckpt.pt")


def out_is_a_link_to_a_file(out, monkeypatch):
    (out.parent / "link").symlink_to(out.parent / "afile")


SECOND_ROUND = [
    # a failure of any kind after --overwrite leaves the old run byte for byte
    ("--overwrite --steps 20 --lr 1e6", None, 1, "gradient norm"),
    ("--overwrite --steps 20", allocation_fails_in_a_step, 2, "out of memory"),
    ("--overwrite --steps 20", exercise_stub_raises, 2, "exercise 1"),
    # every trajectory flag is compared on --resume, and named
    ("--resume --steps 4 --batch-size 4", None, 2, "--batch-size 8, this run has 4"),
    ("--resume --steps 4 --seed 1", None, 2, "--seed 0, this run has 1"),
    ("--resume --steps 4 --lr 0.001", None, 2, "--lr 0.003, this run has 0.001"),
    ("--resume --steps 4 --warmup 3", None, 2, "--warmup 5, this run has 3"),
    ("--resume --steps 4 --grad-accum 2", None, 2, "--grad-accum 1, this run has 2"),
    ("--resume --steps 4 --domain-block 2", None, 2, "--domain-block 1, this run has 2"),
    ("--resume --steps 4 --weight-decay 0.2", None, 2, "--weight-decay 0.1, this run has 0.2"),
    ("--resume --steps 4 --grad-clip 0.5", None, 2, "--grad-clip 1.0, this run has 0.5"),
    ("--resume --steps 4 --data {data}/good", None, 2, "--data None"),
    ("--resume --steps 4 --n-heads 2", None, 2, "--n-heads was 4, now 2"),
    ("--resume --steps 1", None, 2, "past --steps 1"),
    ("--resume --steps 4 --stop-at 2", None, 2, "--stop-at 2"),
    # checkpoints that are not what was written
    ("--resume --steps 4", flipped_byte_in_a_weight, 2, "damaged"),
    ("--resume --steps 4", flipped_byte_in_the_index, 2, "damaged"),
    ("--resume --steps 4", step_edited_by_hand, 2, "damaged"),
    ("--resume --steps 4", weight_edited_by_hand, 2, "damaged"),
    ("--resume --steps 4", checkpoint_without_checksum, 2, "no checksum"),
    ("--resume --steps 4", checkpoint_of_an_older_train_py, 2, "older train.py"),
    ("--resume --steps 4", classmates_checkpoint, 2, "--seed 1, this run has 0"),
    ("--resume --steps 4", log_of_another_run, 2, "another run"),
    # --resume auto: continue, start, or refuse
    ("--resume auto --steps 4", checkpoint_deleted, 2, "--resume auto"),
    ("--resume auto --steps 4 --seed 1", None, 2, "--seed 0, this run has 1"),
    ("--resume auto --steps 4", flipped_byte_in_a_weight, 2, "damaged"),
    ("--resume yes", None, 2, "--resume"),
    # data that is read is reported
    ("--overwrite --data {data}/dangling", None, 2, "z.txt"),
    ("--overwrite --data {data}/fifo", None, 2, "not a regular file"),
    ("--overwrite --data {data}/sparse", machine_with_16gib, 2, "too large"),
    ("--overwrite --data {data}/locked", locked_folder, 2, "cannot read"),
    ("--overwrite --data {data}/secret", secret_file, 2, "secret.txt"),
    ("--overwrite --data {data}/odd", None, 2, "caf\\xe9\\n"),
    # a scheduler's (or a hand-written) environment
    ("", environment(WORLD_SIZE="0"), 2, "WORLD_SIZE"),
    ("", environment(WORLD_SIZE="two"), 2, "WORLD_SIZE"),
    ("", environment(WORLD_SIZE="2", RANK="2"), 2, "RANK"),
    ("", environment(WORLD_SIZE="2", RANK="-1"), 2, "RANK"),
    ("--overwrite", busy_master_port, 2, "MASTER_PORT"),
    ("--out /dev/null", None, 2, "cannot be written"),
    # accidents on a shared lab machine
    ("--resume --steps 4", checkpoint_link_to_nowhere, 2, "no checkpoint"),
    ("--out {root}/link", out_is_a_link_to_a_file, 2, "cannot be written"),
    ("--resume --steps 4 --preset default", None, 2, "different model"),      # forgot --preset tiny
    ("--overwrite --resume auto", None, 2, "not allowed with"),
    ("--overwrite --data {data}/hidden", None, 2, "contains no files"),
    ("--overwrite --data {data}/swapfiles", None, 2, "domain 'b'"),
    ("--overwrite --data {data}/stems", None, 2, "same domain name"),
    ("--resume auto --steps 1", None, 2, "past --steps 1"),
    # what a scheduler's environment can hold
    ("", environment(RANK="1"), 2, "RANK"),
    ("", environment(WORLD_SIZE="2", RANK="0.5"), 2, "RANK"),
]
PROBES += SECOND_ROUND


# Third round (issue 27).

def another_runs_index(out, monkeypatch):
    """Another run's whole, valid ckpt.pt copied over this one's: it names a
    step folder that is not here, and the folder that is here no index names."""
    def aux(c):
        c["config"]["balancer"] = "aux"
        c["shards"] = "ckpt/step_00000002.0badc0de"
    edit_checkpoint(out, aux, reseal=True)


def one_gpu_but_local_rank_1(out, monkeypatch):
    """A scheduler that gives each task one GPU, under a launcher that numbers
    the processes of a node (LOCAL_RANK 1 of a process that sees one GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", CUDA_VISIBLE_DEVICES="3").items():
        monkeypatch.setenv(k, v)


THIRD_ROUND = [
    # a refused run leaves the folder whole, the step folder no index names too
    ("--resume --steps 4", another_runs_index, 2, "different model"),
    # printed by the process that meets it, though its LOCAL_RANK is not 0
    ("--device cuda", one_gpu_but_local_rank_1, 2, "LOCAL_RANK 1 but this process sees 1 GPU"),
    ("", one_gpu_but_local_rank_1, 2, "LOCAL_RANK 1 but this process sees 1 GPU"),
]
PROBES += THIRD_ROUND

FAST = 10.0   # seconds; a probe that takes longer is building or hanging instead of refusing


@pytest.mark.parametrize("flags, setup, code, words", PROBES,
                         ids=[f"{f or '(no flags)'} [{s.__name__ if s else ''}]" for f, s, _, _ in PROBES])
def test_a_bad_input_is_one_line_with_its_exit_code_and_leaves_out_untouched(
        flags, setup, code, words, finished, data_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (tmp_path / "afile").write_text("a file, not a folder\n")
    if setup:
        setup(out, monkeypatch)
    before = snapshot(tmp_path)
    real_bar = plumbing.session.tqdm
    monkeypatch.setattr(plumbing.session, "tqdm", lambda *a, **k: real_bar(*a, **{**k, "disable": True}))
    start = time.time()
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", out,
                             *flags.format(root=tmp_path, data=data_dirs).split())
    took = time.time() - start
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and words in lines[0], err
    assert snapshot(tmp_path) == before, "a refused run changed the files in its folder"
    assert took < FAST, f"took {took:.1f} s to refuse"


# ----------------------------------------------------------------------------
# 2. The ways a run could lose data.

def test_resuming_a_finished_run_says_so_exits_0_and_changes_no_file(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    status, stdout, _ = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", out, "--resume")
    assert status == 0
    assert "finished all 2 steps already" in stdout and str(out) in stdout
    assert snapshot(out) == before


def test_resume_into_a_missing_folder_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "typo" / "run"
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--out", out, "--resume")
    assert status == 2 and len(error_lines(err)) == 1 and "no checkpoint" in err
    assert not (tmp_path / "typo").exists()


def test_a_run_stopped_and_resumed_to_its_end_is_then_finished_and_left_alone(tmp_path, monkeypatch, capsys):
    """--stop-at, then --resume to the end, then --resume again: the third
    call must not retrain, rewrite the log or replace the summary."""
    out = tmp_path / "run"
    assert run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--out", out, "--stop-at", "1")[0] == 0
    assert run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--out", out, "--resume")[0] == 0
    assert log_steps(out) == [1, 2, 3]
    before = snapshot(out)
    status, stdout, _ = run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--out", out, "--resume")
    assert status == 0 and "finished all 3 steps already" in stdout
    assert snapshot(out) == before


def interrupted_log(out):
    """What a hard kill leaves behind: ckpt.pt at step 2, but log.jsonl
    already holding step 3 and half of step 4's line. The log is ahead of the
    checkpoint, so a resume must rewrite it."""
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--stop-at", "2"]) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 5.0}) + "\n" + '{"step": 4, "lo')


@pytest.mark.parametrize("when", ["while writing", "before the rename"])
def test_a_kill_during_the_log_rewrite_on_resume_leaves_log_jsonl_whole(when, tmp_path, monkeypatch):
    """The rewrite goes to a temporary file beside log.jsonl and is renamed
    over it: a kill at any point leaves the old log byte for byte, and no
    temporary file. (KeyboardInterrupt stands in for the kill: like a signal
    it is not an Exception, so nothing on the way may swallow it.)"""
    out = tmp_path / "run"
    interrupted_log(out)
    before = (out / "log.jsonl").read_bytes()
    seen = {}
    if when == "while writing":
        real_write_atomic = plumbing.rundir.write_atomic

        def torn(path, write):
            def half_then_die(f):
                buffer = io.BytesIO()
                write(buffer)
                f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                f.flush()
                seen["tmp"] = "written"
                raise KeyboardInterrupt
            return real_write_atomic(path, half_then_die if Path(path).name == "log.jsonl" else write)
        monkeypatch.setattr(plumbing.rundir, "write_atomic", torn)
    else:
        real_replace = os.replace

        def die_before_rename(src, dst):
            if Path(dst).name == "log.jsonl":
                seen["tmp"] = Path(src)
                seen["content"] = Path(src).read_bytes()
                raise KeyboardInterrupt
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", die_before_rename)
    with pytest.raises(KeyboardInterrupt):
        train.main([*TINY, "--steps", "4", "--out", str(out), "--resume"])
    assert seen, "the log was rewritten without passing through a temporary file"
    if when == "before the rename":
        assert seen["tmp"].parent == out and seen["tmp"] != out / "log.jsonl"
        assert [json.loads(line)["step"] for line in seen["content"].splitlines()] == [1, 2]
    assert (out / "log.jsonl").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--resume"]) == 0
    assert log_steps(out) == [1, 2, 3, 4]


def test_a_log_with_a_torn_or_garbage_tail_does_not_stop_a_resume(tmp_path):
    """After a crash the log may end in a torn line, bytes that are not UTF-8,
    or JSON that is not a record: those lines are dropped, the rest kept."""
    out = tmp_path / "run"
    interrupted_log(out)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b"\n\xff\xfe\x00garbage\n3\n[1, 2]\n{\"step\": \"x\"}\n")
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--resume"]) == 0
    assert log_steps(out) == [1, 2, 3, 4]


def test_a_second_run_on_the_same_out_fails_with_one_line_and_a_killed_run_leaves_no_stale_lock(
        tmp_path, monkeypatch, capsys):
    """The lock is an flock on OUT/.lock: held while the first run lives,
    dropped by the kernel when it is SIGKILLed (the .lock file stays)."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *TINY, "--steps", "100000", "--out", str(out)],
                             cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "ckpt.pt").exists() and (out / "log.jsonl").exists()
                                              and (out / "log.jsonl").read_text().count("\n") >= 12):
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.2)
        assert (out / "ckpt.pt").exists(), "the first run never wrote a checkpoint"
        for extra in ([], ["--resume"], ["--overwrite"]):
            status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "100000", "--out", out, *extra)
            assert status == 2 and len(err.strip().splitlines()) == 1, err
            assert "another run is writing to" in err and "Traceback" not in err
    finally:
        first.kill()                          # SIGKILL: no handler, no cleanup, no unlock
        first.wait(30)
    assert first.returncode == -signal.SIGKILL
    assert (out / ".lock").exists()
    step = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", step + 1, "--out", out, "--resume")
    assert status == 0, err
    assert log_steps(out)[-1] == step + 1


def test_a_full_disk_is_one_line_leaves_no_tmp_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--stop-at", "2"]) == 0
    ckpt_before = (out / "ckpt.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"\0" * 4096)                # part of it made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_full)
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "4", "--out", out, "--resume")
    assert status == 2 and "Traceback" not in err
    assert error_lines(err) == [err.strip().splitlines()[-1]], err
    assert "disk" in err and "full" in err and "--resume" in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "ckpt.pt").read_bytes() == ckpt_before
    names = [p.name for p in (out / "ckpt").iterdir()]
    assert len(names) == 1 and names[0].startswith("step_00000002.")         # the half-written step 3 is gone
    monkeypatch.setattr(torch, "save", real_save)
    assert plumbing.load_model(out)[1]["step"] == 2                           # and step 2 is whole
    # space freed: the run goes on
    assert run_cli(monkeypatch, capsys, *TINY, "--steps", "4", "--out", out, "--resume")[0] == 0
    assert log_steps(out) == [1, 2, 3, 4]


def test_a_run_whose_summary_could_not_be_written_gets_it_on_resume(tmp_path, monkeypatch, capsys):
    """The disk fills up between the final checkpoint and summary.json: the
    error says to free space and --resume, so that resume must write the
    summary (from the final checkpoint, without training), not call the run
    finished and point at a summary.json that is not there."""
    out = tmp_path / "run"
    real_write_atomic = plumbing.rundir.write_atomic

    def full_at_summary(path, write):
        def enospc(f):
            f.write(b"{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_atomic(path, enospc if Path(path).name == "summary.json" else write)
    monkeypatch.setattr(plumbing.rundir, "write_atomic", full_at_summary)
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", out)
    assert status == 2 and "full" in err.strip().splitlines()[-1]
    assert not (out / "summary.json").exists()
    ckpt_before, log_before = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_bytes()
    monkeypatch.setattr(plumbing.rundir, "write_atomic", real_write_atomic)
    status, stdout, _ = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", out, "--resume")
    assert status == 0 and "finished" not in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["val_loss"])
    final = [json.loads(line) for line in log_before.decode().splitlines()][-1]
    assert summary["val_loss"] == pytest.approx(final["val_loss"])      # the same final evaluation
    assert (out / "ckpt.pt").read_bytes() == ckpt_before and (out / "log.jsonl").read_bytes() == log_before


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_log_jsonl_is_strict_json_even_when_a_value_is_nan(tmp_path, monkeypatch):
    """NaN and Infinity are not JSON (jq, JavaScript, most parsers refuse
    them): they are written as null and the record lists them under "nonfinite"."""
    real_step = train.train_step

    def step_with_nan(model, opt, corpus, step, args, proc):
        rec = real_step(model, opt, corpus, step, args, proc)
        if step == 1:
            rec["balance_loss"] = math.nan
            rec["maxvio_batch_by_layer"][0] = math.inf
        return rec
    monkeypatch.setattr(train, "train_step", step_with_nan)
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "3", "--out", str(out)]) == 0
    records = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["balance_loss"] is None and records[1]["maxvio_batch_by_layer"][0] is None
    assert records[1]["nonfinite"] == ["balance_loss", "maxvio_batch_by_layer"]
    assert "nonfinite" not in records[0] and "nonfinite" not in records[2]
    strict_json((out / "summary.json").read_text())


# ----------------------------------------------------------------------------
# The smaller promises.

def test_wall_time_in_the_summary_sums_the_resumed_segments(tmp_path, monkeypatch):
    """A slow first segment (2 steps of >= 0.75 s) and a fast second one:
    the total must include the first, not restart at the resume."""
    real_step = train.train_step

    def slow_step(*a):
        time.sleep(0.75)
        return real_step(*a)
    monkeypatch.setattr(train, "train_step", slow_step)
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--stop-at", "2"]) == 0
    first = torch.load(out / "ckpt.pt", weights_only=False)["wall_time_s"]
    assert first >= 1.5
    monkeypatch.undo()
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--resume"]) == 0
    total = json.loads((out / "summary.json").read_text())["wall_time_s"]
    assert total > first


def saves_at(monkeypatch, out, *flags):
    """The steps at which a run writes ckpt.pt (each checked on disk)."""
    steps, real_save = [], plumbing.checkpoints.save_checkpoint

    def save(path, model, opt, step, meta, proc):
        real_save(path, model, opt, step, meta, proc)
        assert torch.load(path, weights_only=False)["step"] == step
        steps.append(step)
    monkeypatch.setattr(plumbing.checkpoints, "save_checkpoint", save)
    assert train.main([*TINY, "--out", str(out), *flags]) == 0
    return steps


def test_a_tiny_run_has_a_checkpoint_before_its_end(tmp_path, monkeypatch):
    """A preset's run saves on its own cadence (tiny: every 10 of its 20
    steps), so a kill loses at most that many steps, not the whole run."""
    assert train.parse_args(TINY).ckpt_every == 10 and train.parse_args([]).ckpt_every == 100
    assert saves_at(monkeypatch, tmp_path / "run") == [10, 20]


def test_ckpt_every_n_writes_one_every_n_steps(tmp_path, monkeypatch):
    assert saves_at(monkeypatch, tmp_path / "run", "--steps", "7", "--ckpt-every", "3") == [3, 6, 7]


def test_help_shows_real_defaults_and_every_flag_has_help(monkeypatch, capsys):
    parsers = []
    real_parse = plumbing.OneLineParser.parse_args

    def keep(self, *a, **k):
        parsers.append(self)
        return real_parse(self, *a, **k)
    monkeypatch.setattr(plumbing.OneLineParser, "parse_args", keep)
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())        # argparse wraps lines
    assert "(default: None)" not in text and "None" not in text
    assert "--steps N optimizer steps (default: tiny 20; default 1000; gpu 2000)" in text
    actions = {a.dest: a for a in parsers[0]._actions}
    assert "lossfree" in actions["bias_rate"].help and "0.001" in actions["bias_rate"].help   # a knob's own default
    no_help = [a.option_strings for a in actions.values() if not (a.help or "").strip()]
    assert not no_help


def test_the_final_line_names_the_output_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    status, stdout, _ = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", out)
    assert status == 0
    assert stdout.strip().splitlines()[-1].startswith(f"results in {out}/: summary.json")
    status, stdout, _ = run_cli(monkeypatch, capsys, *TINY, "--steps", "4", "--out", out, "--overwrite",
                                "--stop-at", "1")
    assert status == 0 and f"{out / 'ckpt.pt'} saved" in stdout.strip().splitlines()[-1]


def test_a_folder_with_a_repeated_document_reports_the_dropped_duplicates(tmp_path):
    """Two identical files in one domain train as one; the user is told, with
    the size lost, instead of wondering why the folder shrank."""
    for domain, texts in {"a": ["alpha " * 40, "alpha " * 40, "beta " * 40], "b": ["gamma " * 40, "delta " * 40]}.items():
        (tmp_path / domain).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / domain / f"{i}.txt").write_text(text)
    lines = []
    corpus = data.load_corpus(str(tmp_path), seq_len=8, log=lines.append)
    dropped = [line for line in lines if line.startswith("note:")]
    assert dropped == ["note: domain 'a': dropped 1 repeated document(s), 240 B (a copy in the validation "
                       "split would leak training text)"]
    assert corpus.train_docs[0] + corpus.val_docs[0] == 2


# ----------------------------------------------------------------------------
# 3. torchrun.

def test_under_torchrun_a_bad_argument_stops_every_rank_with_one_line(tmp_path):
    """Both ranks check the flags before the process group starts, so neither
    waits for the other at a rendezvous; only rank 0 prints. torchrun then
    adds its own failure report ("ChildFailedError ... exitcode: 2") from the
    launcher process; a worker cannot suppress it, so the test counts our
    line, not the lines of stderr.

    GLOO_SOCKET_IFNAME names a network interface that does not exist, so a
    gloo process group cannot start here at all (torchrun's own rendezvous
    does not use gloo): the line can only come from a check made before it."""
    out = tmp_path / "run"
    start = time.time()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *TINY, "--steps", "0", "--out", str(out)],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="nosuchif0"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("error: --steps") == 1, res.stderr
    assert time.time() - start < 60
    assert not out.exists()                     # refused before anything was written


def test_a_shard_that_fails_to_read_is_one_line(tmp_path, monkeypatch, capsys):
    """An I/O error inside torch.distributed.checkpoint's reader (after the
    sha256s passed: a disk going bad, a network filesystem dropping out)
    reaches the user as one line, not as dcp's CheckpointException."""
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--stop-at", "2"]) == 0

    def failing(self, plan, planner):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemReader, "read_data", failing)
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "4", "--out", out, "--resume")
    assert status == 2 and "Traceback" not in err
    assert error_lines(err) == [err.strip().splitlines()[-1]] and "cannot be read" in err, err


def test_under_torchrun_a_missing_shard_of_another_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1's file of a 2-process checkpoint is gone: the sha256 pass is
    shared out among the ranks, and a file one rank cannot read stops both
    with the same line, instead of leaving the other waiting in a collective."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           "--steps", "4", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    assert subprocess.run(cmd + ["--stop-at", "2"], cwd=ROOT, env=env, capture_output=True, timeout=180).returncode == 0
    next((out / "ckpt").glob("*/__1_*.distcp")).unlink()
    start = time.time()
    res = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode != 0 and time.time() - start < 60
    assert res.stderr.count("error: --resume:") == 1 and "cannot be read" in res.stderr, res.stderr[-2000:]
    # torchrun's launcher adds a traceback of its own (ChildFailedError); a
    # worker's would pass through plumbing/.
    assert "plumbing/" not in res.stderr, res.stderr[-2000:]


# ----------------------------------------------------------------------------
# 4. The other entry points: the same standard (one line, exit 2, nothing
#    written: not in the probe's folder, not in results/ or the README).

def torn_results(root):
    (root / "pub").mkdir()
    (root / "pub" / "results.json").write_text('{"plots": ["routing.png"')      # a kill mid-write


def results_without_plots(root):
    (root / "pub").mkdir()
    (root / "pub" / "results.json").write_text('{"plots": []}')


def results_with_a_missing_plot(root):
    """The published results themselves, copied without their pictures."""
    (root / "pub").mkdir()
    shutil.copy(ROOT / "results" / "results.json", root / "pub" / "results.json")


def nothing_to_publish(root):
    (root / "pub").mkdir()


def no_such_exercise_folder(root, monkeypatch):
    monkeypatch.setenv("EXERCISES_FROM", str(root / "nonexistent"))


OTHER_PROBES = [
    ("bench", "--repeats 0", None, "--repeats"),
    ("bench", "--repeats 1000000000", None, "--repeats"),
    ("bench", "--warmup -1", None, "--warmup"),
    ("bench", "--threads 0", None, "--threads"),
    ("bench", "--threads 100000", None, "--threads"),
    ("bench", "--json {root}/missing/figures.json", None, "--json"),
    ("bench", "--json {root}", None, "is a folder"),
    ("compare", "--publish --out {root}/pub", torn_results, "damaged"),
    ("compare", "--publish --out {root}/pub", results_without_plots, "damaged"),
    ("compare", "--publish --out {root}/pub", results_with_a_missing_plot, "results.json"),
    ("compare", "--publish --out {root}/pub", nothing_to_publish, "to publish"),
    ("compare", "--out {root}/afile", None, "is a file"),
    ("exercises", "--preset tiny --steps 2 --out {root}/run", no_such_exercise_folder, "EXERCISES_FROM"),
]


@pytest.mark.parametrize("tool, flags, setup, words", OTHER_PROBES,
                         ids=[f"{t} {f} [{s.__name__ if s else ''}]" for t, f, s, _ in OTHER_PROBES])
def test_the_other_entry_points_refuse_in_one_line_and_write_nothing(tool, flags, setup, words, tmp_path,
                                                                      monkeypatch, capsys):
    (tmp_path / "afile").write_text("a file, not a folder\n")
    if setup:
        setup(tmp_path, monkeypatch) if setup is no_such_exercise_folder else setup(tmp_path)
    argv = flags.format(root=tmp_path).split()
    watched = [tmp_path, ROOT / "results"]
    before = [snapshot(p) for p in watched], (ROOT / "README.md").read_bytes()
    if tool == "exercises":
        import exercises.run as entry
        monkeypatch.setattr(sys, "argv", ["exercises/run.py", *argv])
        main = entry.main
    else:
        main = lambda: {"bench": bench, "compare": compare}[tool].main(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        plumbing.cli(main)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and words in err, err
    assert ([snapshot(p) for p in watched], (ROOT / "README.md").read_bytes()) == before


def test_ctrl_c_stops_the_whole_comparison_whatever_jobs(tmp_path, monkeypatch):
    """In-process (--jobs 1): train.py saves and returns at Ctrl-C, and no
    further run starts. With subprocesses the interrupt reaches lab/compare.py's
    main thread: the runs not yet started never start."""
    class Plan:
        common, runs = [], {f"run{i}": (["--balancer", "aux"], 0) for i in range(4)}
    started = []
    monkeypatch.setattr(compare, "run_state", lambda run_dir, argv: "new")
    monkeypatch.setattr(compare, "train_one", lambda run_dir, *a: started.append(run_dir.name))   # None: stopped
    assert compare.run_plan(Plan(), tmp_path, 1, None) is None and started == ["run0"]

    def interrupted(run_dir, *a):
        started.append(run_dir.name)
        raise KeyboardInterrupt
    started.clear()
    monkeypatch.setattr(compare, "train_one", interrupted)
    assert compare.run_plan(Plan(), tmp_path, 1, [sys.executable]) is None and started == ["run0"]


def test_reuse_does_not_take_a_run_without_its_log_for_finished(tmp_path):
    argv = ["--preset", "tiny"]
    (tmp_path / "run.json").write_text(json.dumps({"argv": argv, "finished": True}))
    (tmp_path / "summary.json").write_text(json.dumps({"val_loss": 1.0}))
    assert compare.run_state(tmp_path, argv) != "done"
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    assert compare.run_state(tmp_path, argv) == "done"


# ----------------------------------------------------------------------------
# 5. Second round, named: what one row of the table cannot show.

def content(path):
    """A file's sha256, or a folder's: of its files' names and contents."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(repr([(str(p.relative_to(path)), content(p)) for p in sorted(path.rglob("*"))
                                if p.is_file()]).encode()).hexdigest()


def run_files(out):
    """What a run folder holds (ckpt.pt, ckpt/, log.jsonl, summary.json), by content (missing ones absent)."""
    return {n: content(out / n) for n in plumbing.RUN_FILES if (out / n).exists()}


def assert_one_run(out):
    """ckpt.pt, every log line and summary.json (if any) carry one run id."""
    ckpt = plumbing.read_checkpoint(out / "ckpt.pt")
    ids = {json.loads(line)["run"] for line in (out / "log.jsonl").read_text().splitlines()}
    assert ids == {ckpt["run_id"]}, (ids, ckpt["run_id"])
    if (out / "summary.json").exists():
        assert json.loads((out / "summary.json").read_text())["run"] == ckpt["run_id"]
    return ckpt


def test_overwrite_killed_at_any_moment_leaves_the_old_run_or_a_whole_new_one(finished, tmp_path):
    """SIGKILL at random moments and a scheduler's SIGTERM, each against a copy
    of a finished run being overwritten: afterwards the folder holds the old
    run byte for byte, or the new run whole (checkpoint, log and summary of
    one run id), never a mixture. Both outcomes occur."""
    old = run_files(finished)
    rng = random.Random(19)
    # (signal, seconds after the new run logged its first step; None: at once, while Python starts)
    kills = [(signal.SIGKILL, None)] + [(signal.SIGKILL, rng.uniform(0.0, 1.5)) for _ in range(2)] + \
        [(signal.SIGTERM, 0.0)]
    outs, procs = [tmp_path / f"run{i}" for i in range(len(kills))], []
    for out in outs:                     # all at once: starting Python and torch is most of the time
        shutil.copytree(finished, out)
        procs.append(subprocess.Popen([sys.executable, "train.py", *TINY, "--steps", "100000", "--ckpt-every", "20",
                                       "--overwrite", "--out", str(out)], cwd=ROOT,
                                      env=dict(os.environ, OMP_NUM_THREADS="1"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    outcomes = []
    try:
        for (sig, delay), out, proc in zip(kills, outs, procs):
            if delay is not None:
                deadline = time.time() + 120
                logs = [out / d / "log.jsonl" for d in (plumbing.STAGE, plumbing.SWAP)]
                while not any(p.exists() and p.stat().st_size for p in logs) and run_files(out) == old:
                    assert time.time() < deadline and proc.poll() is None
                    time.sleep(0.01)
                time.sleep(delay)
            proc.send_signal(sig)
            proc.wait(60)
            files = run_files(out)
            if files == old:
                outcomes.append("old")
            else:
                assert set(files) == {"ckpt", "ckpt.pt", "log.jsonl"}, files      # interrupted: no summary yet
                assert_one_run(out)
                plumbing.load_model(out)                                         # its checkpoint is whole
                outcomes.append("new")
    finally:
        for proc in procs:              # a failed check must not leave 100000-step runs behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes


def swap_interrupted_at(moment):
    """os.replace and shutil.rmtree that stop (as a kill would) at one moment
    of RunDir.finish_swap: before it moves the log, the new step folder, the
    index, or before it removes the emptied .swap."""
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst):
        src = Path(src)
        if {"log": src.name == "log.jsonl" and src.parent.name == plumbing.SWAP,
                "step folder": src.parent.name == "ckpt" and src.parent.parent.name == plumbing.SWAP,
                "index": src.name == "ckpt.pt" and src.parent.name == plumbing.SWAP}.get(moment):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    def rmtree(path, *a, **k):
        if moment == "cleanup" and Path(path).name == plumbing.SWAP:
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)
    return replace, rmtree


@pytest.mark.parametrize("moment", ["log", "step folder", "index", "cleanup"])
def test_a_swap_interrupted_at_any_moment_is_finished_by_the_next_run(finished, tmp_path, monkeypatch, moment):
    """A kill between the renames that replace an old run's files, at each of
    them: meanwhile the folder's index names a whole checkpoint (the old one
    or the new one: a reader such as sample.py can load it), and the next run
    in the folder completes the swap before anything else, losing nothing of
    the new run (its whole log, its checkpoint)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old_id = json.loads((out / "summary.json").read_text())["run"]
    replace, rmtree = swap_interrupted_at(moment)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        train.main([*TINY, "--steps", "4", "--ckpt-every", "2", "--overwrite", "--out", str(out)])
    monkeypatch.undo()
    assert (out / plumbing.SWAP).is_dir() and not (out / "summary.json").exists()
    assert plumbing.load_model(out)[1]["step"] == 2                     # whole, old or new
    assert train.main([*TINY, "--steps", "4", "--out", str(out), "--resume"]) == 0
    ckpt = assert_one_run(out)
    assert ckpt["run_id"] != old_id and log_steps(out) == [1, 2, 3, 4] and not (out / plumbing.SWAP).exists()
    assert [p.name for p in (out / "ckpt").iterdir()] == [ckpt["folder"].name]


def test_stale_temporary_files_and_an_unfinished_new_run_are_removed(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for name in (".ckpt.pt.k9x1.tmp", ".log.jsonl.a8b2.tmp", ".summary.json.zz.tmp"):
        (out / name).write_bytes(b"\0" * 100)
    kept = plumbing.read_checkpoint(out / "ckpt.pt")["folder"].name
    (out / "ckpt" / "step_00000099.0a1b2c3d").mkdir()       # written before a kill stopped its index
    (out / "ckpt" / "step_00000099.0a1b2c3d" / "__0_0.distcp").write_bytes(b"\0" * 100)
    (out / plumbing.STAGE).mkdir()
    (out / plumbing.STAGE / "log.jsonl").write_text("{}\n")
    (out / "notes.tmp").write_text("mine")                 # not a file of ours: kept
    assert train.main([*TINY, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt", "ckpt.pt", "log.jsonl", "notes.tmp",
                                                     "summary.json"]
    names = [p.name for p in (out / "ckpt").iterdir()]
    assert len(names) == 1 and names[0].startswith("step_00000003.") and kept.startswith("step_00000002.")


def test_output_flags_take_effect_on_resume(tmp_path):
    """--stop-at and --log-every are not trajectory flags: given with
    --resume they apply; so does a raised --steps."""
    out = str(tmp_path / "run")
    assert train.main([*TINY, "--steps", "6", "--out", out, "--stop-at", "2"]) == 0
    assert train.main([*TINY, "--steps", "6", "--out", out, "--resume", "--stop-at", "4", "--log-every", "2"]) == 0
    assert torch.load(Path(out) / "ckpt.pt", weights_only=False)["step"] == 4 and log_steps(out) == [1, 2, 4]
    assert train.main([*TINY, "--steps", "8", "--out", out, "--resume"]) == 0
    assert log_steps(out) == [1, 2, 4, 5, 6, 7, 8]
    assert json.loads((Path(out) / "summary.json").read_text())["steps"] == 8


def test_resume_after_the_data_folder_changed_is_refused(tmp_path, monkeypatch, capsys):
    """A domain added to --data, or one file edited: the batches would no
    longer be the run's, so the resume stops and says why."""
    folder = tmp_path / "text"
    for name, letter in (("a", "x"), ("b", "y")):
        (folder / name).mkdir(parents=True)
        (folder / name / "doc.txt").write_text((letter * 50 + "\n\n") * 400)
    out = tmp_path / "run"
    flags = [*TINY, "--steps", "3", "--out", out, "--data", folder]
    assert run_cli(monkeypatch, capsys, *flags, "--stop-at", "1")[0] == 0
    (folder / "c").mkdir()
    (folder / "c" / "doc.txt").write_text(("z" * 50 + "\n\n") * 400)
    status, _, err = run_cli(monkeypatch, capsys, *flags, "--resume")
    assert status == 2 and "training data changed" in err and len(error_lines(err)) == 1
    shutil.rmtree(folder / "c")
    (folder / "a" / "doc.txt").write_text((("x" * 50 + "\n\n") * 400).replace("x", "w", 1))
    status, _, err = run_cli(monkeypatch, capsys, *flags, "--resume")
    assert status == 2 and "training data changed" in err
    (folder / "a" / "doc.txt").write_text(("x" * 50 + "\n\n") * 400)
    assert run_cli(monkeypatch, capsys, *flags, "--resume")[0] == 0                 # restored: it goes on


def test_an_empty_file_beside_one_file_keeps_the_domain_chunked(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.txt").write_text(("one paragraph of text\n" * 20 + "\n") * 250)     # ~100 KB
    (tmp_path / "a" / "empty.txt").write_text("")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "other.txt").write_text(("another kind of text\n" * 20 + "\n") * 250)
    lines = []
    corpus = data.load_corpus(str(tmp_path), seq_len=64, log=lines.append)
    assert corpus.val_docs[0] > 0 and len(corpus.val[0]) > 0
    assert any("ignoring 1 empty file" in line and "empty.txt" in line for line in lines)


def test_odd_file_names_are_printed_escaped_under_a_strict_utf8_terminal(tmp_path):
    for name in (b"caf\xe9", b"tab\there"):
        os.makedirs(os.path.join(os.fsencode(str(tmp_path)), name))
        with open(os.path.join(os.fsencode(str(tmp_path)), name, b"doc.txt"), "wb") as f:
            f.write(b"some text to read\n\n" * 2000)
    res = subprocess.run([sys.executable, "-c", f"import data; data.load_corpus({str(tmp_path)!r}, seq_len=16)"],
                         cwd=ROOT, env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "caf\\xe9" in res.stdout and "tab\\there" in res.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_data_is_one_line_for_a_real_user(tmp_path, monkeypatch, capsys):
    for name in ("a", "b"):
        (tmp_path / "text" / name).mkdir(parents=True)
        (tmp_path / "text" / name / "doc.txt").write_text("text " * 5000)
    for target in (tmp_path / "text" / "b" / "doc.txt", tmp_path / "text" / "b"):
        target.chmod(0)
        try:
            status, _, err = run_cli(monkeypatch, capsys, *TINY, "--out", tmp_path / "run", "--data", tmp_path / "text")
        finally:
            target.chmod(0o755)
        assert status == 2 and len(error_lines(err)) == 1 and "Permission denied" in err


def test_a_full_disk_in_torch_saves_own_words_is_one_line(tmp_path, monkeypatch, capsys):
    """A real full disk reaches torch.save as a RuntimeError of its C++ zip
    writer, not as an OSError."""
    def disk_full(obj, f, *a, **k):
        f.write(b"\0" * 1024)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1046")
    monkeypatch.setattr(torch, "save", disk_full)
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", tmp_path / "run")
    assert status == 2 and "Traceback" not in err and "full" in error_lines(err)[-1]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_log_that_cannot_be_written_is_one_line_without_a_second_error_at_close(tmp_path, monkeypatch, capsys):
    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        flush = write

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_open_log = plumbing.RunDir.open_log

    def open_log(self, *a):
        records = real_open_log(self, *a)
        self.logf = FullDisk(self.logf)
        return records
    monkeypatch.setattr(plumbing.RunDir, "open_log", open_log)
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", tmp_path / "run")
    assert status == 2 and "Traceback" not in err and error_lines(err) == [err.strip().splitlines()[-1]], err
    assert "cannot write" in err and "log.jsonl" in err


def disagreeing_ranks(rank, world_size):
    """A flag given to one node only, and data that differ by node."""
    proc = plumbing.Proc(rank, world_size)
    try:
        proc.check_same_everywhere({"--seed": 0, "--lr": 0.003 if rank == 0 else 0.001, "data": "same"})
    except ValueError as e:
        return str(e)
    return None


def test_ranks_started_differently_all_stop_with_one_line_naming_the_flag_and_the_ranks():
    messages = plumbing.spawn(disagreeing_ranks, 2)
    assert messages[0] == messages[1] and messages[0] is not None
    assert "--lr differs (rank 0: 0.003; rank 1: 0.001)" in messages[0]


def tmpfs(folder, size):
    """Mount a tmpfs of `size` at folder (root only); False where that is not possible."""
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_is_one_line_in_one_process_and_under_torchrun(tmp_path, monkeypatch, capsys):
    """A 300 KB filesystem (a tiny checkpoint is 3 MB): the first checkpoint
    cannot be written. One process: one line, exit 2, no temporary file.
    Two processes: one line from rank 0, and no traceback of this project's
    code from either rank (torchrun's own failure report aside)."""
    disk = tmp_path / "disk"
    if not tmpfs(disk, "300k"):
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        status, _, err = run_cli(monkeypatch, capsys, *TINY, "--steps", "2", "--out", disk / "run")
        assert status == 2 and "Traceback" not in err and "full" in error_lines(err)[-1], err
        assert not [p for p in (disk / "run").iterdir() if p.name.endswith(".tmp")]
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", *TINY, "--steps", "2", "--out", str(disk / "run2")],
                             cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             timeout=180)
        assert res.returncode != 0
        ours = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(ours) == 1 and "full" in ours[0], res.stderr
        assert not re.search(r'(train|moe|plumbing/\w+)\.py", line', res.stderr), res.stderr
    finally:
        subprocess.run(["umount", str(disk)])


def rank_process(out, rank):
    """The pid of train.py's process of `rank` writing to `out` (from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in env and b"train.py" in cmd and str(out).encode() in cmd \
                and b"torch.distributed.run" not in cmd:
            return int(entry.name)
    return None


def test_torchrun_restarts_with_resume_auto_continue_the_same_loss_after_a_killed_rank(tmp_path):
    """torchrun --max-restarts=1 ... --resume auto: rank 1 is SIGKILLed after
    the first checkpoint; the survivor stops (it says in one line whom it
    lost, or torchrun's SIGTERM ends it first); torchrun starts both again,
    they resume, and the run ends exactly as an uninterrupted two-process
    run does."""
    def launch(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max-restarts=1", "train.py", *TINY, "--steps", "40", "--ckpt-every", "10",
                                 "--resume", "auto", "--out", str(out), *extra], cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    whole = launch(tmp_path / "whole")
    killed = launch(tmp_path / "killed")
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "ckpt.pt").exists():
        assert time.time() < deadline and killed.poll() is None, killed.communicate()
        time.sleep(0.05)
    victim, survivor = rank_process(tmp_path / "killed", 1), rank_process(tmp_path / "killed", 0)
    assert victim is not None and survivor is not None
    os.kill(victim, signal.SIGKILL)
    _, err = killed.communicate(timeout=240)
    assert killed.returncode == 0, err
    assert whole.wait(240) == 0
    # Whether rank 0 meets the lost peer or torchrun's SIGTERM first is up to
    # the scheduler (on a loaded machine torchrun often wins): either way the
    # survivor of the first attempt was stopped, not left waiting.
    assert "rank 0 of 2 lost contact with rank 1" in err or \
        f"Sending process {survivor} closing signal SIGTERM" in err, err
    final = [json.loads((tmp_path / run / "summary.json").read_text())["val_loss"] for run in ("whole", "killed")]
    assert final[0] == final[1]
    assert log_steps(tmp_path / "killed") == list(range(1, 41))


def test_a_flag_given_to_one_node_only_stops_both_nodes_with_one_line_each(tmp_path):
    """Two torchrun launchers on this machine stand for two nodes of one
    process each; the second is given another --lr. Each node prints the
    same line naming the flag and the ranks (its LOCAL_RANK 0 prints), and
    both exit with an error before anything is written."""
    port = plumbing.free_port()

    def node(rank, *extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                                 "--nproc_per_node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                                 "train.py", *TINY, "--steps", "2", "--out", str(tmp_path / "run"), *extra],
                                cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    nodes = [node(0), node(1, "--lr", "0.001")]
    errs = [n.communicate(timeout=180)[1] for n in nodes]
    for n, err in zip(nodes, errs):
        ours = [line for line in err.splitlines() if line.startswith("error:")]
        assert n.returncode != 0 and len(ours) == 1, err
        assert "--lr differs (rank 0: 0.003; rank 1: 0.001)" in ours[0]
    assert not (tmp_path / "run").exists()


def test_resume_auto_starts_where_there_is_nothing_and_continues_where_there_is_a_run(tmp_path, monkeypatch, capsys):
    """Nothing in OUT (or only the log of a run killed before its first
    checkpoint): a fresh run. A checkpoint of this run: continued. A
    finished run: left alone, exit 0."""
    out = tmp_path / "run"
    assert run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--stop-at", "2", "--out", out, "--resume", "auto")[0] == 0
    assert run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--out", out, "--resume", "auto")[0] == 0
    first = assert_one_run(out)
    assert log_steps(out) == [1, 2, 3]
    status, stdout, _ = run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--out", out, "--resume", "auto")
    assert status == 0 and "finished all 3 steps already" in stdout
    for name in ("ckpt.pt", "summary.json"):
        (out / name).unlink()                        # what a kill before the first checkpoint leaves
    assert run_cli(monkeypatch, capsys, *TINY, "--steps", "3", "--out", out, "--resume", "auto")[0] == 0
    assert assert_one_run(out)["run_id"] != first["run_id"] and log_steps(out) == [1, 2, 3]


# ----------------------------------------------------------------------------
# 6. Third round (issue 27), named.

def test_a_resume_refused_over_another_runs_checkpoint_changes_no_file(tmp_path, monkeypatch, capsys):
    """The issue's steps: a lossfree run in A, an aux run in B, B's ckpt.pt
    copied over A's, then A resumed as lossfree. The refusal is one line, and
    A's own step folder, which the foreign index does not name, is still
    there with every other file: the folder is cleaned up only once a run is
    accepted."""
    a, b = tmp_path / "A", tmp_path / "B"
    for out, balancer in ((a, "lossfree"), (b, "aux")):
        assert train.main([*TINY, "--balancer", balancer, "--out", str(out), "--steps", "4"]) == 0
    shutil.copy(b / "ckpt.pt", a / "ckpt.pt")
    before = snapshot(a)
    status, _, err = run_cli(monkeypatch, capsys, *TINY, "--balancer", "lossfree", "--out", a, "--steps", "4",
                             "--resume")
    assert status == 2 and error_lines(err) == [err.strip().splitlines()[-1]] and "Traceback" not in err, err
    assert "different model" in err
    assert snapshot(a) == before, "a refused run changed the files in its folder"
    assert [name for name in before if name.endswith("/.metadata")], "A's own step folder was not in the snapshot"


def test_a_runs_start_removes_half_written_step_folders_but_keeps_whole_ones_no_index_names(finished, tmp_path):
    """Opening the folder removes nothing; accepting the run removes stale
    temporary files and a step folder without dcp's .metadata (a kill
    stopped it), never a whole one that the index does not name."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    named = plumbing.read_checkpoint(out / "ckpt.pt")["folder"]
    whole, half = out / "ckpt" / "step_00000001.feedface", out / "ckpt" / "step_00000099.0a1b2c3d"
    shutil.copytree(named, whole)
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"\0" * 100)
    (out / ".ckpt.pt.k9x1.tmp").write_bytes(b"\0" * 100)
    before = snapshot(out)
    run = plumbing.open_run_dir(out, plumbing.Proc(), True, False)
    try:
        assert snapshot(out) == before, "opening the folder changed it before the run was accepted"
        run.accepted()
        assert whole.is_dir() and named.is_dir() and (whole / ".metadata").is_file()
        assert not half.exists() and not (out / ".ckpt.pt.k9x1.tmp").exists()
        kept = snapshot(out)
        run.accepted()                          # a second call does nothing
        assert snapshot(out) == kept
    finally:
        run.close()


def test_a_second_ctrl_c_during_evaluation_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real process and real signals. Every step is evaluated on a large
    validation set, so evaluation is nearly all of a step: the first SIGINT
    sets the stop flag while one runs, and the second, half a second later,
    lands in the same evaluation. The process ends at once with one line
    and a non-zero code, no traceback, and the checkpoint of the step before
    is whole and matches the log."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--steps", "100000", "--eval-every", "1",
                             "--val-seqs", "2000", "--out", str(out)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180

        def logged():
            return (out / "log.jsonl").read_text().count("\n") if (out / "log.jsonl").exists() else 0
        while logged() < 1:
            assert time.time() < deadline and proc.poll() is None, "the run never logged its first step"
            time.sleep(0.05)
        # Just after a step's line is logged, the next step's save and
        # training take a fraction of a second; then its evaluation starts.
        seen = logged()
        while logged() == seen:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.01)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()                 # only the process started above
            proc.wait(30)
    assert proc.returncode not in (0, None) and proc.returncode > 0, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert error_lines(err) == [err.strip().splitlines()[-1]], err[-2000:]
    assert "interrupted again" in err and "--resume" in err, err[-2000:]
    ckpt = assert_one_run(out)
    plumbing.load_model(out)                                   # whole
    assert ckpt["step"] == log_steps(out)[-1]


def test_a_local_rank_past_the_gpus_this_process_sees_is_one_line_naming_the_fix(monkeypatch):
    """LOCAL_RANK numbers the GPUs a process sees; one past them (a scheduler
    giving each task one GPU, a CUDA_VISIBLE_DEVICES naming fewer) is refused
    before torch.cuda.set_device dies with "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    for local in ("1", "5", "-1", "x"):
        monkeypatch.setenv("LOCAL_RANK", local)
        for device in ("cuda", "auto"):
            with pytest.raises(ValueError) as e:
                plumbing.Proc.from_env(device)
            line = str(e.value)
            assert len(line.splitlines()) == 1
            assert f"LOCAL_RANK {local} but this process sees 1 GPU (CUDA_VISIBLE_DEVICES='3')" in line, line
            assert "--nproc_per_node=1" in line and "unset CUDA_VISIBLE_DEVICES" in line, line
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert plumbing.Proc.from_env("cuda").device == torch.device("cuda", 0)
    # A CUDA_VISIBLE_DEVICES naming no GPU that exists: PyTorch sees none.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"sees no CUDA GPU \(CUDA_VISIBLE_DEVICES='3'\)"):
        plumbing.Proc.from_env("cuda")
