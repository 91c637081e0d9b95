"""
plumbing/rundir.py -- the output folder: a lock so two runs cannot share it,
the log (rewritten atomically on resume, strictly valid JSON), summary.json;
a run id in all three, and a new run that replaces an old one only at its
first checkpoint.
"""

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from .checkpoints import open_checkpoint, remove_folders_but, shard_root
from .files import cannot_write, finite_json, first_line, share_failure, write_atomic


STAGE, SWAP, MOVES = ".next", ".swap", "MOVES"          # folders inside OUT, and the swap's list; see RunDir


LATEST = "latest"          # without --out: runs/BALANCER/latest names the newest run folder
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
    between those, the next run in OUT finishes them before anything else.

    Opening the folder changes nothing in it but that unfinished swap (and
    the lock): whatever a killed run left behind is cleaned up, and .next
    made, only once the run is accepted (accepted(), which open_log calls
    after the resume checks), so a run refused after open_run_dir leaves
    the folder as it found it."""

    def __init__(self, out, proc, resume, overwrite):
        self.out, self.proc = Path(out), proc
        self.ckpt, self.log_path, self.summary = (self.out / name for name in ("ckpt.pt", "log.jsonl", "summary.json"))
        self.shards = shard_root(self.ckpt)
        self.lock = self.logf = self.stage = self.run_id = self.error = None
        self.resume = resume is True
        self.replaces = self.cleaned = False
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
            # Before the checks: a swap a kill interrupted was already the
            # new run's (see the class), and the checks must see its files.
            self.finish_swap()
            self.check(resume, overwrite)
            self.replaces = not self.resume and any(p.exists() for p in (self.ckpt, self.log_path, self.summary))
        except OSError as e:
            self.close()
            raise self.unusable(e) from None
        except ValueError:
            self.close()
            raise

    def unusable(self, e):
        return ValueError(f"--out {self.out} cannot be used ({e.strerror or first_line(e)}): check its "
                          f"permissions, or choose another folder")

    def accepted(self):
        """The run passed every check and will train here: only now remove
        what killed runs left (remove_stale) and, for a new run over an old
        one, make .next. Until then a refused run (another run's checkpoint,
        a changed flag) has changed nothing. Every rank calls it (a failure
        stops them all); calling it again does nothing. (Collective.)"""
        if self.cleaned:
            return
        self.cleaned = True

        def clean_up():
            try:
                self.remove_stale()
                if self.replaces:
                    self.stage = self.out / STAGE
                    self.stage.mkdir()
            except OSError as e:
                raise self.unusable(e) from None
        share_failure(self.proc, clean_up, f"into {self.out}")

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
        # checkpoint was deleted to save space (lab/compare.py does) still has a
        # log and results that a fresh run here would replace.
        for p in (self.ckpt, self.summary):
            if p.exists() and not (resume or overwrite):
                raise ValueError(f"{p} already exists: add --resume to continue that run, --overwrite to "
                                 f"start over, or choose another --out")

    def remove_stale(self):
        """What a killed run leaves: half-written temporary files, a new
        run's folder that never reached its first checkpoint, and step
        folders that a kill stopped before they were whole. The lock is
        ours, so no live run is writing them."""
        for name in RUN_FILES:
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink()
        self.prune_step_folders(whole_too=False)
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
            brought = [n for n in RUN_FILES if (swap / n).exists()]   # no readable MOVES: what .swap holds
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
        self.prune_step_folders(whole_too=True)    # the replaced run's
        shutil.rmtree(swap)

    def prune_step_folders(self, whole_too):
        """Remove the step folders in ckpt/ that the index does not name.
        whole_too False (a run's start): only those without dcp's .metadata,
        which dcp writes last, so a kill stopped them half-written. A whole
        folder that no index names is kept: it may be the only copy of a run
        whose ckpt.pt was replaced by another's; the run's own next
        checkpoint removes its leftovers (save_checkpoint). whole_too True:
        a swap's new run replaces the old one's folders. Nothing is removed
        unless the index is readable and the folder it names is here, whole."""
        if not self.shards.is_dir() or self.shards.is_symlink():
            return
        try:
            keep = open_checkpoint(self.ckpt)["folder"]
        except ValueError:
            return
        # An index that names a folder not here (copied from another run)
        # says nothing about the folders that are here.
        if keep.parent != self.shards or not (keep / ".metadata").is_file():
            return
        if whole_too:
            remove_folders_but(self.shards, keep.name)
            return
        for p in self.shards.glob("step_*"):
            if p != keep and p.is_dir() and not p.is_symlink() and not (p / ".metadata").exists():
                shutil.rmtree(p, ignore_errors=True)

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
        is refused rather than continued. The last check of a run: the
        run is accepted here (the folder's cleanup follows). (Collective.)"""
        self.run_id = run_id
        records, error = [], None
        if self.proc.main:
            try:
                records = self.read_log(upto_step, run_id)
            except ValueError as e:
                error = e
        if self.proc.any_rank(error is not None):
            raise error or ValueError(f"--resume: {self.log_path} holds steps of another run (rank 0 says which)")
        self.accepted()
        if not self.proc.main:
            return []
        path = self.target("log.jsonl")
        write_atomic(path, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in records))
        self.logf = open(path, "a")
        return records

    def read_log(self, upto_step, run_id):
        """This run's records up to upto_step (see open_log)."""
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


def default_run_folder(balancer, resume, proc, root="runs"):
    """Without --out: a new folder for every run, runs/BALANCER/run-001,
    run-002, ..., so that running the same command again (after editing a
    strategy, say) keeps the earlier run; runs/BALANCER/latest names the
    newest, and `sample.py runs/BALANCER` finds it. --resume (and --resume
    auto, if there is one) continues the newest. Rank 0 decides for all."""
    family = Path(root) / balancer
    answer = None
    if proc.main:
        latest = family / LATEST
        if resume and latest.is_symlink() and latest.exists():
            answer = str(family / os.readlink(latest))
        elif resume is True:
            answer = ValueError(f"--resume: no earlier run in {family}/ to continue; run without --resume "
                                f"first, or name the run's folder with --out")
        else:
            numbers = [int(p.name[4:]) for p in family.glob("run-*") if p.name[4:].isdigit()]
            answer = str(family / f"run-{max(numbers, default=0) + 1:03d}")
    answer = proc.share(answer)
    if isinstance(answer, ValueError):
        raise answer
    return answer


def point_latest(out, proc):
    """runs/BALANCER/latest -> this run's folder (a relative symlink, replaced
    atomically). Rank 0 only."""
    if not proc.main:
        return
    out = Path(out)
    tmp = out.parent / f".{LATEST}.{uuid.uuid4().hex}.tmp"
    os.symlink(out.name, tmp)
    os.replace(tmp, out.parent / LATEST)


def open_run_dir(out, proc, resume, overwrite):
    """RunDir on rank 0, with its verdict shared: if rank 0 may not use the
    folder, every rank stops at once instead of training without it; and
    with --resume auto, every rank learns whether there is a run to continue."""
    error, run = None, None
    try:
        run = RunDir(out, proc, resume, overwrite)
    except ValueError as e:
        error = e
    if proc.any_rank(error is not None):
        raise error or ValueError(f"--out {out} cannot be used (rank 0 says why)")
    run.resume = proc.any_rank(run.resume)
    return run
