"""
plumbing/files.py -- files that are never half-written: atomic replacement,
strict JSON, and write failures (a full disk included) as one line shared by
every rank.
"""

import errno
import json
import math
import os
import tempfile
from pathlib import Path


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
    if proc.any_rank(error is not None):
        raise error or ValueError(f"rank 0 could not write {what} (rank 0's line says why)")
