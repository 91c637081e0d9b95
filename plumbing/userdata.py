"""
plumbing/userdata.py -- the data a run reads that is not the lesson: the
user's own folder of text (--data: one domain per subfolder or per file,
unreadable or odd files refused in one line) and the built-in corpus's cache
on disk (written atomically, checked by checksums before it is reused).
"""

import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path

from .files import write_atomic


class DataError(ValueError):
    """Bad user input about data; its message is one line naming the problem and the fix."""


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# -----------------------------------------------------------------------------
# the user's folder of text files


MIN_CHUNK, MAX_CHUNK = 512, 16_384


def chunk_text(data: bytes, target: int) -> list[bytes]:
    """Cut one long file into documents of roughly `target` bytes, preferring
    paragraph breaks (blank lines) so a document is a coherent piece of text.
    A stretch with no blank line is cut hard, so one huge paragraph still
    becomes several documents. Concatenating the chunks gives back `data`."""
    cuts = [0]
    for m in re.finditer(rb"\n\s*\n", data):
        while m.end() - cuts[-1] > 2 * target:
            cuts.append(cuts[-1] + target)
        if m.end() - cuts[-1] >= target:
            cuts.append(m.end())
    while len(data) - cuts[-1] > 2 * target:
        cuts.append(cuts[-1] + target)
    cuts.append(len(data))
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def file_as_documents(data: bytes) -> list[bytes]:
    """A domain given as a single file still needs many documents, or there is
    nothing to split into train and val. Aim for ~32 chunks, within limits."""
    target = min(MAX_CHUNK, max(MIN_CHUNK, len(data) // 32))
    return chunk_text(data, target)


def visible(path: Path) -> bool:
    # hidden files and folders (.DS_Store, .git, editor swap files) are not
    # text the user meant to train on
    return not any(part.startswith(".") for part in path.parts)


def shown(name: str) -> str:
    """A file name as it can always be printed and stored: bytes that are not
    UTF-8 (kept by Python as surrogates) as \\xNN, control characters (a
    newline in a name) escaped. A strict UTF-8 terminal would otherwise stop
    the run with a codec error."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def files_under(folder: Path) -> list[Path]:
    """Every visible file under `folder`, in a fixed order. A folder that
    cannot be listed stops the run (Path.rglob would skip it without a word,
    and the domain would train on part of its text)."""
    def refuse(e: OSError):
        raise DataError(f"cannot read {shown(e.filename or str(folder))} ({e.strerror}) under the data "
                        "folder; fix its permissions or move it out") from None
    found = []
    for here, subdirs, names in os.walk(folder, onerror=refuse, followlinks=True):   # as rglob did
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(here) / n for n in names if not n.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_files(paths: list[Path], budget: list[int]) -> list[bytes]:
    """The files' bytes. Unreadable files stop the run with one line; so does
    more data than a quarter of this machine's memory (the corpus is held in
    memory, several copies while it is built), found from the sizes before
    anything is read: a huge (or sparse) file must not end in an out-of-memory kill."""
    docs = []
    for path in paths:
        try:
            budget[0] -= path.stat().st_size
            if budget[0] < 0:
                raise DataError(f"the data folder is too large to hold in memory (at {shown(str(path))}: "
                                f"more than {human(memory_bytes() // 4)}, a quarter of this machine's "
                                "memory); train on a part of it")
            docs.append(path.read_bytes())
        except OSError as e:
            raise DataError(f"cannot read {shown(str(path))} ({e.strerror}); fix its permissions or move "
                            "it out of the data folder") from None
    return docs


def user_documents(data_dir: str, log=print) -> dict[str, list[bytes]]:
    """Documents per domain from the user's folder. Two layouts:
    - subfolders: each subfolder is a domain, each file in it (recursively) a
      document; a subfolder holding a single file has that file cut into chunks;
    - flat: each file is a domain named after its stem, cut into chunks.
    Files are read as raw bytes: any encoding, or none, is fine. Empty files
    in a domain folder are left out (and said so), so they do not turn a
    one-file domain into one that is not chunked; a file or folder that
    cannot be read stops the run."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {shown(str(root))} does not exist or is not a folder; "
                        "pass an existing folder, or no data folder to use the built-in corpus")
    try:
        entries = sorted(p for p in root.iterdir() if visible(p.relative_to(root)))
    except OSError as e:
        raise DataError(f"cannot read the data folder {shown(str(root))} ({e.strerror}); fix its "
                        "permissions") from None
    folders = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    budget = [memory_bytes() // 4]

    def size(path):
        try:
            st = path.stat()
        except OSError as e:                       # a dangling link, a file removed meanwhile
            raise DataError(f"cannot read {shown(str(path))} ({e.strerror}); fix it or move it out of "
                            "the data folder") from None
        if not stat.S_ISREG(st.st_mode):           # a named pipe or a device would block or never end
            raise DataError(f"{shown(str(path))} is not a regular file (a pipe, socket or device); move it "
                            "out of the data folder")
        return st.st_size

    def non_empty(paths):
        empty = [p for p in paths if size(p) == 0]
        if empty:
            log(f"note: ignoring {len(empty)} empty file(s): {', '.join(shown(str(p.relative_to(root))) for p in empty[:3])}"
                + (" ..." if len(empty) > 3 else ""))
        return [p for p in paths if p not in empty]

    domains = {}
    if folders:
        if files:
            log(f"note: ignoring {len(files)} file(s) next to the domain folders in {shown(str(root))}")
        for folder in folders:
            paths = files_under(folder)
            docs = read_files(non_empty(paths), budget)
            if len(docs) == 1:
                docs = file_as_documents(docs[0])
            domains[shown(folder.name)] = docs
    else:
        for path in files:                         # a file is a domain here: an empty one is an error below
            if shown(path.stem) in domains:
                raise DataError(f"two files in {shown(str(root))} give the same domain name "
                                f"'{shown(path.stem)}'; rename one of them")
            domains[shown(path.stem)] = file_as_documents(read_files([path], budget)[0])

    if not domains:
        raise DataError(f"data folder {shown(str(root))} contains no files; put one text file per domain "
                        "(or one subfolder of files per domain) in it")
    for name, docs in domains.items():
        if sum(len(d) for d in docs) == 0:
            raise DataError(f"domain '{name}' in {shown(str(root))} has no bytes; add text to it or remove it")
    return domains


# -----------------------------------------------------------------------------
# the built-in corpus's cache

CACHE_FORMAT = 1  # bump when the corpus recipe changes, so old caches are not reused


def default_cache_dir() -> Path:
    # the code domain is this interpreter's own standard library, so each
    # Python version gets its own corpus
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    version = "{}.{}.{}".format(*sys.version_info[:3])
    return base / "moe-balance-lab" / f"corpus-py{version}-v{CACHE_FORMAT}"


def write_cache(cache_dir: Path, domains, train, val, train_docs, val_docs):
    """One .bin file per domain and split, then meta.json. meta.json is written
    last and lists a checksum of every .bin, so it doubles as the 'cache is
    complete' marker. Each file is replaced atomically under its own temporary
    name, so ranks building at once (torchrun starts them together) never
    interleave bytes; they write identical files, so either rename may win."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, tr, va in zip(domains, train, val):
        for split, data in (("train", tr), ("val", va)):
            fname = f"{name}.{split}.bin"
            write_atomic(cache_dir / fname, lambda f: f.write(data))
            files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta = {"format": CACHE_FORMAT, "domains": domains, "train_docs": train_docs,
            "val_docs": val_docs, "files": files}
    # no timestamps or paths in here: two builds must give identical files
    text = json.dumps(meta, indent=1, sort_keys=True).encode()
    write_atomic(cache_dir / "meta.json", lambda f: f.write(text))


def read_cache(cache_dir: Path):
    """The cached corpus, or None if there is none or it does not check out
    (missing file, wrong size or checksum, older format)."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_bytes())
        if meta.get("format") != CACHE_FORMAT:
            return None
        blobs = {}
        for fname, info in meta["files"].items():
            data = (cache_dir / fname).read_bytes()
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                return None
            blobs[fname] = data
        domains = meta["domains"]
        train = [blobs[f"{name}.train.bin"] for name in domains]
        val = [blobs[f"{name}.val.bin"] for name in domains]
        return domains, train, val, meta["train_docs"], meta["val_docs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
