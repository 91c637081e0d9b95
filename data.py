"""
Data for the Mixture-of-Experts load-balancing lab.

The point of an MoE layer is that different experts can specialise. To see
whether that happens (and how load balancing helps or hurts it), the model
has to be trained on text that comes from clearly different *domains*, and
every sequence has to carry the label of the domain it came from. This file
teaches how such a corpus is put together:

  1. tokens are raw bytes, so the vocabulary is 256 and nothing needs training;
  2. a built-in corpus that needs no download: Python source code and English
     help text that ship with every CPython, plus generated arithmetic;
  3. splitting train/val by whole documents, so validation text is unseen;
  4. sampling batches that are a pure function of (seed, step), so a run can
     be split over ranks and gradient-accumulation micro-steps and still see
     exactly the same global batch;
  5. a fixed validation set, identical on every call and in every run.

Read it top to bottom. The user's own folder (--data) and the corpus's cache
on disk are plumbing/userdata.py.
"""

import hashlib
import math
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from plumbing.userdata import DataError, default_cache_dir, human, read_cache, user_documents, write_cache

# -----------------------------------------------------------------------------
# tokens are bytes

VOCAB_SIZE = 256


def encode(data: str | bytes) -> torch.Tensor:
    """UTF-8 bytes of the text as a 1-D uint8 tensor: every byte is one token."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    data = bytes(data)
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    # bytearray gives frombuffer a writable buffer it may own, so the
    # tensor never aliases an immutable bytes object
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode(tokens) -> str:
    """Tokens back to text. A window cut at a random byte may split a multi-byte
    character, so undecodable bytes become U+FFFD instead of raising."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.flatten().tolist()
    return bytes(tokens).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# the built-in corpus: three domains that need no network

CODE_CAP_BYTES = 4_000_000  # keeps the first build to a second or two
MATH_TARGET_BYTES = 1_500_000

# parts of the standard library that are not ordinary hand-written code:
# test suites, generated tables, vendored data, or (pydoc_data) the prose domain
SKIP_DIRS = {
    "test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__",
    "turtledemo", "encodings", "ensurepip", "distutils", "pydoc_data",
}


def stdlib_files() -> list[Path]:
    """The standard library's .py files, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        if rel.parts[0].startswith("config-"):  # build configuration, not library code
            continue
        if rel.name.startswith("_sysconfigdata"):  # machine-specific generated dict
            continue
        files.append(path)
    # sort on the relative path so the order does not depend on the filesystem
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def code_documents() -> list[bytes]:
    """Domain `code`: one document per standard-library source file."""
    files = stdlib_files()
    total = sum(p.stat().st_size for p in files)
    # Taking every k-th file instead of the first few megabytes spreads the
    # sample over the whole library (asyncio, email, json, xml, ...), not just
    # the modules whose names start with a, b and c.
    stride = max(1, math.ceil(total / CODE_CAP_BYTES))
    docs, size = [], 0
    for path in files[::stride]:
        if size >= CODE_CAP_BYTES:
            break
        doc = path.read_bytes()
        docs.append(doc)
        size += len(doc)
    return docs


def prose_documents(log=print) -> list[bytes]:
    """Domain `prose`: the English help topics that `help()` shows offline.
    Some trimmed-down Python builds leave them out; the lab still works with
    the other domains then."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        log("note: pydoc_data.topics is not installed, the built-in corpus has no prose domain")
        return []
    return [topics[name].encode("utf-8") for name in sorted(topics)]


def math_line(rng: random.Random) -> str:
    """One line of arithmetic. The answers are exact, so a model can actually
    learn the rules rather than memorise noise; the last kind writes out the
    intermediate step, which gives the line a longer-range structure."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        b, q = rng.randint(1, 12), rng.randint(0, 99)
        return f"{b * q} / {b} = {q}"  # built from the answer so it divides exactly
    if kind == 4:
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 9)
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    a, b, c = rng.randint(0, 99), rng.randint(0, 9), rng.randint(0, 99)
    return f"{a} + {b} * {c} = {a} + {b * c} = {a + b * c}"


def math_documents() -> list[bytes]:
    """Domain `math`: generated worksheets of a few hundred lines each.
    A private, fixed-seed Random makes the bytes the same on every machine
    and keeps the global `random` state untouched."""
    rng = random.Random(0)
    docs, size = [], 0
    while size < MATH_TARGET_BYTES:
        lines = [math_line(rng) for _ in range(rng.randint(200, 400))]
        doc = ("\n".join(lines) + "\n").encode("ascii")
        docs.append(doc)
        size += len(doc)
    return docs


def builtin_documents(log=print) -> dict[str, list[bytes]]:
    """All documents of the built-in corpus, per domain."""
    docs = {"code": code_documents(), "prose": prose_documents(log), "math": math_documents()}
    return {name: d for name, d in docs.items() if d}


# -----------------------------------------------------------------------------
# splitting train/val by document

VAL_FRACTION = 0.1


def unique_documents(docs: list[bytes]) -> list[bytes]:
    """Drop empty and repeated documents (the standard library has several
    identical little files). A copy of a training document in the validation
    set would leak training text into the score."""
    seen, out = set(), []
    for doc in docs:
        key = hashlib.sha256(doc).digest()
        if doc and key not in seen:
            seen.add(key)
            out.append(doc)
    return out


def split_documents(docs: list[bytes], val_fraction: float = VAL_FRACTION) -> list[bool]:
    """For each document: does it go to validation?

    "Every 10th document" would be the simplest rule, but documents differ a
    lot in size (a help topic is 200 bytes to 60 KB), so the validation set
    could end up far from 10% of the bytes. Instead walk the documents in
    order and send the next one to validation whenever validation holds less
    than its share of the bytes seen so far. The decision is made before
    looking at the document, so big and small documents are equally likely
    to be held out; for equal-sized documents it picks every 10th."""
    is_val, seen, val = [], 0, 0
    for doc in docs:
        to_val = seen > 0 and val < val_fraction * seen
        is_val.append(to_val)
        seen += len(doc)
        val += len(doc) if to_val else 0
    return is_val


def split_domain(docs: list[bytes]) -> tuple[bytes, bytes, int, int]:
    """Train stream, val stream and their document counts for one domain.
    Documents are simply concatenated: windows may cross a document boundary
    inside one split, never across splits."""
    is_val = split_documents(docs)
    train = b"".join(d for d, v in zip(docs, is_val) if not v)
    val = b"".join(d for d, v in zip(docs, is_val) if v)
    n_val = sum(is_val)
    return train, val, len(docs) - n_val, n_val


# -----------------------------------------------------------------------------
# the corpus (its on-disk cache is plumbing/userdata.py)

@dataclass
class Corpus:
    domains: list[str]            # domain names, sorted; the index is the domain id
    train: list[torch.Tensor]     # per domain, 1-D uint8 stream of the training documents
    val: list[torch.Tensor]       # per domain, 1-D uint8 stream of the validation documents
    train_docs: list[int]         # per domain, number of training documents
    val_docs: list[int]           # per domain, number of validation documents
    source: str                   # where it came from, for logs


def fingerprint(corpus: Corpus) -> str:
    """A short hash of exactly what is trained and validated on: the domain
    names and every byte of both splits. Two corpora with the same
    fingerprint give the same batches, so a run may resume on it (or be
    spread over machines that each read their own copy)."""
    h = hashlib.sha256()
    for name, train, val in zip(corpus.domains, corpus.train, corpus.val):
        h.update(f"{name!r} {len(train)} {len(val)}".encode())
        h.update(train.numpy())
        h.update(val.numpy())
    return h.hexdigest()[:16]


def build(docs_by_domain: dict[str, list[bytes]], log=print):
    """Documents per domain -> sorted domain names, train and val streams, doc
    counts. Dropping repeated documents is reported: a folder of copies can
    shrink to a fraction of its size, and a user should know why."""
    domains = sorted(docs_by_domain)
    unique = {name: unique_documents(docs_by_domain[name]) for name in domains}
    for name in domains:
        dropped = [d for d in docs_by_domain[name] if d]
        n_dropped = len(dropped) - len(unique[name])
        if n_dropped:
            lost = sum(map(len, dropped)) - sum(map(len, unique[name]))
            log(f"note: domain '{name}': dropped {n_dropped} repeated document(s), {human(lost)} "
                f"(a copy in the validation split would leak training text)")
    parts = [split_domain(unique[name]) for name in domains]
    train, val, train_docs, val_docs = (list(column) for column in zip(*parts))
    return domains, train, val, train_docs, val_docs


def builtin_corpus(cache_dir, log=print):
    """The built-in corpus: from the cache if it is there, else built and cached."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = read_cache(cache_dir)
    if cached is not None:
        log(f"using cached corpus at {cache_dir}")
        return cached, f"built-in (cache {cache_dir})"
    log(f"building the built-in corpus into {cache_dir} (one time; delete the folder to rebuild)")
    parts = build(builtin_documents(log), log)
    try:
        write_cache(cache_dir, *parts)
    except (OSError, ValueError) as e:         # ValueError: plumbing's one line for a failed write
        raise DataError(f"cannot write the corpus cache at {cache_dir} ({getattr(e, 'strerror', None) or e}); "
                        "pass a writable cache folder") from None
    return parts, f"built-in (cache {cache_dir})"


def check_lengths(corpus: Corpus, seq_len: int):
    """Every stream must fit at least one (input, target) window of seq_len + 1
    bytes; the spec asks for strictly longer so there is more than one choice."""
    for i, name in enumerate(corpus.domains):
        for split, stream, n_docs in (("train", corpus.train[i], corpus.train_docs[i]),
                                      ("val", corpus.val[i], corpus.val_docs[i])):
            if len(stream) <= seq_len + 1:
                raise DataError(
                    f"domain '{name}' is too short: its {split} split has {len(stream)} bytes "
                    f"in {n_docs} document(s) but seq_len={seq_len} needs more than {seq_len + 1}; "
                    "add more text (or more files) to that domain or use a smaller seq_len")


def load_corpus(data_dir: str | None = None, cache_dir: str | None = None,
                seq_len: int = 128, log=print) -> Corpus:
    """The corpus to train on: the built-in one (cached) when data_dir is None,
    else the user's folder (read fresh every time, it is small and may change)."""
    if seq_len <= 0:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}; pass e.g. seq_len=128")
    if data_dir is None:
        parts, source = builtin_corpus(cache_dir, log)
    else:
        parts, source = build(user_documents(data_dir, log), log), f"data folder {data_dir}"
    domains, train, val, train_docs, val_docs = parts
    if not domains:
        raise DataError(f"no domains found in {source}; add text to it")
    corpus = Corpus(domains=list(domains), train=[encode(b) for b in train],
                    val=[encode(b) for b in val], train_docs=list(train_docs),
                    val_docs=list(val_docs), source=source)

    log(f"corpus: {source}, {len(corpus.domains)} domains")
    width = max(len(name) for name in corpus.domains)
    for i, name in enumerate(corpus.domains):
        tr, va = len(corpus.train[i]), len(corpus.val[i])
        log(f"  {name:<{width}}  {human(tr + va):>9} total  train {human(tr):>9} "
            f"({corpus.train_docs[i]} docs)  val {human(va):>9} ({corpus.val_docs[i]} docs)")
    check_lengths(corpus, seq_len)
    return corpus


# -----------------------------------------------------------------------------
# training batches

def global_batch_plan(corpus: Corpus, step: int, seed: int, batch_size: int, seq_len: int,
                      domain_block: int = 1):
    """Domain and start offset of each of the batch_size sequences of one step.
    Each run of `domain_block` consecutive sequences shares one domain: with
    domain_block = a balance group, every group is single-domain, the setting
    of Qiu et al. 2025 (Sec. 2.2) in which micro-batch balancing hurts most.

    Only (seed, step) seed the generator, nothing that depends on the rank,
    the number of ranks or the accumulation steps: every process can compute
    the whole plan by itself (it is a few hundred numbers) and they all agree.
    It also means a resumed run sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    # Domains are drawn uniformly, not in proportion to their size: otherwise
    # the biggest domain (code) would fill most batches and the small ones
    # would barely be seen, and we want every domain to compete for experts.
    if batch_size % domain_block:
        raise DataError(f"domain_block {domain_block} must divide the batch of {batch_size} sequences")
    domain = torch.randint(len(corpus.domains), (batch_size // domain_block,), generator=g)
    domain = domain.repeat_interleave(domain_block)
    # valid starts are 0 .. len - seq_len - 1, so that y = tokens[s+1 : s+T+1] fits
    n_starts = torch.tensor([len(t) - seq_len for t in corpus.train], dtype=torch.float64)[domain]
    u = torch.rand(batch_size, generator=g, dtype=torch.float64)
    start = torch.minimum((u * n_starts).long(), n_starts.long() - 1)
    return domain, start


def get_batch(corpus: Corpus, step: int, seed: int, batch_size: int, seq_len: int,
              rank: int = 0, world_size: int = 1, micro_step: int = 0, grad_accum: int = 1,
              domain_block: int = 1):
    """This process's share of the global batch of `step`.

    batch_size is the global batch: sequences per optimizer step over all ranks
    and micro-steps. The global batch is cut into world_size * grad_accum equal,
    contiguous chunks, and (rank, micro_step) takes chunk rank * grad_accum +
    micro_step. Hence 1 GPU x 4 micro-steps and 2 GPUs x 2 micro-steps train
    on exactly the same sequences in the same order."""
    chunks = world_size * grad_accum
    if batch_size <= 0 or batch_size % chunks:
        raise DataError(f"batch_size {batch_size} must be a positive multiple of world_size * grad_accum "
                        f"= {chunks}; change batch_size or grad_accum")
    if not (0 <= rank < world_size and 0 <= micro_step < grad_accum):
        raise DataError(f"rank {rank} / micro_step {micro_step} out of range for world_size {world_size} "
                        f"and grad_accum {grad_accum}; pass values within those ranges")
    for name, stream in zip(corpus.domains, corpus.train):
        if len(stream) <= seq_len:
            raise DataError(f"domain '{name}' has {len(stream)} training bytes, too few for seq_len "
                            f"{seq_len}; use a smaller seq_len")

    domain, start = global_batch_plan(corpus, step, seed, batch_size, seq_len, domain_block)
    b = batch_size // chunks
    lo = (rank * grad_accum + micro_step) * b
    domain, start = domain[lo:lo + b], start[lo:lo + b]
    # only our b rows are read; one slice per row, no per-token Python work
    rows = torch.stack([corpus.train[d][s:s + seq_len + 1]
                        for d, s in zip(domain.tolist(), start.tolist())]).long()
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return x, y, domain


# -----------------------------------------------------------------------------
# the fixed validation set

def val_windows(stream: torch.Tensor, seq_len: int, max_seqs: int) -> list[int]:
    """Start offsets of up to max_seqs non-overlapping windows of seq_len + 1
    bytes, evenly spread over the stream so they sample all of it, not just the
    first documents. With n <= len // (seq_len + 1) windows the spacing is at
    least seq_len + 1, so no two windows share a byte."""
    n = min(max_seqs, len(stream) // (seq_len + 1))
    if n <= 1:
        return [0] * n
    last = len(stream) - (seq_len + 1)
    return [i * last // (n - 1) for i in range(n)]


def val_batches(corpus: Corpus, seq_len: int, batch_size: int, max_seqs_per_domain: int = 64):
    """The validation set as a list of (x, y, domain) batches.

    It uses no random numbers at all, so it is identical on every call and in
    every run, and loss curves of different runs can be compared point by point.

    Windows are interleaved across domains (code, math, prose, code, ...), so
    each batch is a mix like the training batches are. That matters for MoE:
    with a capacity limit, which tokens overflow depends on who else is in the
    batch, and an all-code batch would be judged under unusual crowding.

    The model wants a fixed batch size, so the last batch is topped up by
    wrapping around to the first windows of the list (rather than dropping the
    remainder): every window is evaluated, and a handful are counted twice."""
    if seq_len <= 0 or batch_size <= 0:
        raise DataError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive; "
                        "pass positive values")
    per_domain = []
    for name, stream in zip(corpus.domains, corpus.val):
        starts = val_windows(stream, seq_len, max_seqs_per_domain)
        if not starts:
            raise DataError(f"domain '{name}' has {len(stream)} validation bytes, too few for "
                            f"seq_len {seq_len}; use a smaller seq_len or add text to that domain")
        per_domain.append(starts)

    order = []  # (domain, start), round-robin over domains
    for i in range(max(len(s) for s in per_domain)):
        order += [(d, starts[i]) for d, starts in enumerate(per_domain) if i < len(starts)]
    n_batches = math.ceil(len(order) / batch_size)
    order = [order[i % len(order)] for i in range(n_batches * batch_size)]

    batches = []
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        rows = torch.stack([corpus.val[d][s:s + seq_len + 1] for d, s in chunk]).long()
        domain = torch.tensor([d for d, _ in chunk], dtype=torch.long)
        batches.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), domain))
    return batches
