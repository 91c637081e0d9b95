"""Tests for data.py: tokens, the built-in corpus and its cache, user folders,
the train/val split, and the batch sampling rules the training loop relies on."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from data import DataError
from plumbing import userdata

# The fast tier: python -m pytest -m lesson
pytestmark = pytest.mark.lesson


def quiet(*args, **kwargs):
    pass


def cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder, temp files included (there should be none)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    """One cold build of the built-in corpus, shared by the tests below."""
    folder = tmp_path_factory.mktemp("cache")
    logs = []
    corpus = data.load_corpus(cache_dir=str(folder), log=logs.append)
    return folder, corpus, logs


def write_domains(root: Path, texts: dict[str, bytes]):
    """A flat user folder: one file per domain."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (root / f"{name}.txt").write_bytes(text)
    return root


def alphabet_text(alphabet: bytes, n: int, seed: int) -> bytes:
    """n random bytes drawn from `alphabet`, with a blank line every ~300
    bytes so the file splits into paragraph documents."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += bytes(rng.choice(alphabet) for _ in range(300)) + b"\n\n"
    return bytes(out)


ALPHABETS = {"digits": b"0123456789", "lower": b"abcdefghijklmnopqrstuvwxyz",
             "upper": b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


@pytest.fixture
def alphabet_corpus(tmp_path):
    """Three domains whose bytes never overlap: a window's alphabet tells its domain."""
    texts = {name: alphabet_text(a, 20_000, i) for i, (name, a) in enumerate(ALPHABETS.items())}
    return data.load_corpus(str(write_domains(tmp_path / "user", texts)), seq_len=32, log=quiet)


# -----------------------------------------------------------------------------
# 1. tokens

def test_encode_decode_round_trips_arbitrary_bytes_including_invalid_utf8():
    raw = bytes(range(256)) + b"\xff\xfe\xc3(\x80 caf\xc3\xa9"
    tokens = data.encode(raw)
    assert tokens.dtype == torch.uint8 and tokens.dim() == 1 and len(tokens) == len(raw)
    assert bytes(tokens.tolist()) == raw
    text = "naïve ∑ café 🙂"
    assert data.decode(data.encode(text)) == text
    assert data.decode(data.encode(text).tolist()) == text
    assert data.decode(data.encode(b"ok\xff")) == "ok\ufffd"  # no exception on bad bytes
    assert len(data.encode(b"")) == 0


# -----------------------------------------------------------------------------
# 2. built-in corpus and cache

def test_builtin_corpus_has_at_least_three_domains_of_nontrivial_size(builtin_cache):
    _, corpus, _ = builtin_cache
    assert len(corpus.domains) >= 3
    assert corpus.domains == sorted(corpus.domains)
    for name, tr, va in zip(corpus.domains, corpus.train, corpus.val):
        assert tr.dtype == torch.uint8 and va.dtype == torch.uint8
        assert len(tr) > 100_000, name
        assert len(va) > 20_000, name


def test_two_fresh_builds_write_byte_identical_cache_files(builtin_cache, tmp_path):
    first, _, _ = builtin_cache
    data.load_corpus(cache_dir=str(tmp_path / "again"), log=quiet)
    a, b = cache_files(first), cache_files(tmp_path / "again")
    assert "meta.json" in a and any(n.endswith(".bin") for n in a)
    assert not any(n.endswith(".tmp") for n in a)  # nothing left half-written
    assert a == b


def test_second_load_reads_the_cache_without_rebuilding(builtin_cache, monkeypatch):
    folder, corpus, logs = builtin_cache
    assert not any("using cached corpus" in line for line in logs)

    def no_building(*args, **kwargs):
        raise AssertionError("the corpus was rebuilt although a valid cache exists")

    monkeypatch.setattr(data, "builtin_documents", no_building)
    logs2 = []
    again = data.load_corpus(cache_dir=str(folder), log=logs2.append)
    assert any("using cached corpus" in line and str(folder) in line for line in logs2)
    assert again.domains == corpus.domains
    assert all(torch.equal(a, b) for a, b in zip(again.train + again.val, corpus.train + corpus.val))


def test_damaged_cache_is_rebuilt_not_trusted(builtin_cache, tmp_path):
    folder, corpus, _ = builtin_cache
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, blob in cache_files(folder).items():
        (damaged / name).write_bytes(blob)
    victim = damaged / f"{corpus.domains[0]}.train.bin"
    victim.write_bytes(victim.read_bytes()[:1000])  # as if a copy was cut short
    logs = []
    again = data.load_corpus(cache_dir=str(damaged), log=logs.append)
    assert not any("using cached corpus" in line for line in logs)
    assert torch.equal(again.train[0], corpus.train[0])
    assert cache_files(damaged) == cache_files(folder)


def test_two_processes_building_the_same_cache_at_once_agree(builtin_cache, tmp_path):
    folder, _, _ = builtin_cache
    shared = tmp_path / "shared"
    code = ("import sys, data; c = data.load_corpus(cache_dir=sys.argv[1], log=lambda *a: None); "
            "print(sum(len(t) for t in c.train + c.val))")
    cwd = Path(data.__file__).parent
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shared)], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode() for _, err in outs]
    assert outs[0][0] == outs[1][0]
    assert cache_files(shared) == cache_files(folder)


# -----------------------------------------------------------------------------
# 3. train/val split by document

def test_builtin_validation_stream_is_made_only_of_held_out_documents(builtin_cache):
    _, corpus, _ = builtin_cache
    docs_by_domain = data.builtin_documents(log=quiet)
    for i, name in enumerate(corpus.domains):
        docs = data.unique_documents(docs_by_domain[name])
        is_val = data.split_documents(docs)
        train_docs = [d for d, v in zip(docs, is_val) if not v]
        val_docs = [d for d, v in zip(docs, is_val) if v]
        assert train_docs and val_docs
        # the streams are exactly these document sets, nothing else
        assert bytes(corpus.train[i].tolist()) == b"".join(train_docs)
        assert bytes(corpus.val[i].tolist()) == b"".join(val_docs)
        # and no held-out document also appears (as a copy) among the training ones
        assert not set(train_docs) & set(val_docs), name
        val_share = sum(map(len, val_docs)) / sum(map(len, docs))
        assert 0.05 < val_share < 0.2, (name, val_share)


def test_no_validation_window_contains_bytes_of_a_training_document(tmp_path):
    # each document is a single letter repeated, so a window's letters name
    # the documents it was cut from
    folder = tmp_path / "user" / "letters"
    folder.mkdir(parents=True)
    letters = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrst"
    for i, ch in enumerate(letters):
        (folder / f"{i:02d}.txt").write_bytes(bytes([ch]) * 400)
    corpus = data.load_corpus(str(tmp_path / "user"), seq_len=16, log=quiet)
    train_letters = set(corpus.train[0].tolist())
    val_letters = set(corpus.val[0].tolist())
    assert train_letters and val_letters and not train_letters & val_letters
    assert len(train_letters) + len(val_letters) == len(letters)

    seen = set()
    for x, y, _ in data.val_batches(corpus, seq_len=16, batch_size=4):
        seen |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    assert seen and seen <= val_letters
    x, y, _ = data.get_batch(corpus, step=0, seed=0, batch_size=64, seq_len=16)
    assert set(x.flatten().tolist()) | set(y.flatten().tolist()) <= train_letters


def test_split_holds_out_about_every_tenth_of_equal_documents():
    is_val = data.split_documents([b"x" * 100] * 100)
    assert sum(is_val) == 10
    assert not is_val[0]


# -----------------------------------------------------------------------------
# 4. and 5. training batches

def test_global_batch_is_identical_across_world_sizes_and_grad_accum(builtin_cache):
    _, corpus, _ = builtin_cache
    B, T = 24, 64
    x1, y1, d1 = data.get_batch(corpus, step=7, seed=3, batch_size=B, seq_len=T)
    assert x1.shape == y1.shape == (B, T) and d1.shape == (B,)
    assert x1.dtype == y1.dtype == d1.dtype == torch.long
    for world_size, grad_accum in [(2, 1), (1, 2), (2, 2), (3, 4)]:
        parts = [data.get_batch(corpus, step=7, seed=3, batch_size=B, seq_len=T, rank=r,
                                world_size=world_size, micro_step=m, grad_accum=grad_accum)
                 for r in range(world_size) for m in range(grad_accum)]
        assert all(p[0].shape == (B // (world_size * grad_accum), T) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert torch.equal(torch.cat([p[2] for p in parts]), d1)


def test_batch_depends_only_on_seed_and_step(builtin_cache):
    _, corpus, _ = builtin_cache
    a = data.get_batch(corpus, step=5, seed=1, batch_size=16, seq_len=32)
    torch.manual_seed(123)  # the global RNG must play no part
    b = data.get_batch(corpus, step=5, seed=1, batch_size=16, seq_len=32)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], data.get_batch(corpus, step=6, seed=1, batch_size=16, seq_len=32)[0])
    assert not torch.equal(a[0], data.get_batch(corpus, step=5, seed=2, batch_size=16, seq_len=32)[0])


def test_domain_block_puts_one_domain_in_every_balance_group(builtin_cache):
    """--domain-block S: every S consecutive sequences come from one domain, so
    a balance group of S sequences is single-domain (Qiu et al. 2025, Sec.
    2.2), while the global batch still mixes domains. S = 1 is the plain
    batch, draw for draw."""
    _, corpus, _ = builtin_cache
    _, _, plain = data.get_batch(corpus, step=4, seed=0, batch_size=32, seq_len=16)
    _, _, same = data.get_batch(corpus, step=4, seed=0, batch_size=32, seq_len=16, domain_block=1)
    assert torch.equal(plain, same)
    _, _, dom = data.get_batch(corpus, step=4, seed=0, batch_size=32, seq_len=16, domain_block=8)
    blocks = dom.view(4, 8)
    assert (blocks == blocks[:, :1]).all()
    assert len(set(blocks[:, 0].tolist())) > 1 or len(set(
        data.get_batch(corpus, step=s, seed=0, batch_size=32, seq_len=16, domain_block=8)[2][0].item()
        for s in range(8))) > 1


def test_batch_size_not_divisible_by_world_size_times_grad_accum_is_a_data_error(builtin_cache):
    _, corpus, _ = builtin_cache
    with pytest.raises(DataError):
        data.get_batch(corpus, step=0, seed=0, batch_size=10, seq_len=8, world_size=2, grad_accum=2)


def test_every_sequence_comes_from_the_domain_its_label_names(alphabet_corpus):
    corpus = alphabet_corpus
    streams = [bytes(t.tolist()) for t in corpus.train]
    alphabets = [set(ALPHABETS[name]) | set(b"\n") for name in corpus.domains]
    counts = torch.zeros(len(corpus.domains))
    for step in range(20):
        x, y, dom = data.get_batch(corpus, step=step, seed=0, batch_size=16, seq_len=32)
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        for row_x, row_y, d in zip(x.tolist(), y.tolist(), dom.tolist()):
            window = bytes(row_x + row_y[-1:])
            assert set(window) <= alphabets[d]
            assert window in streams[d]
            counts[d] += 1
    # uniform over domains: each gets roughly a third of 320 sequences
    assert counts.min() > 60


# -----------------------------------------------------------------------------
# validation batches

def test_val_batches_are_fixed_full_sized_and_cover_every_domain(alphabet_corpus):
    corpus = alphabet_corpus
    first = data.val_batches(corpus, seq_len=32, batch_size=10, max_seqs_per_domain=8)
    torch.manual_seed(99)
    second = data.val_batches(corpus, seq_len=32, batch_size=10, max_seqs_per_domain=8)
    assert len(first) == len(second) == 3  # 24 windows -> 3 batches of 10, the last wrapped
    for (x, y, d), (x2, y2, d2) in zip(first, second):
        assert x.shape == y.shape == (10, 32) and d.shape == (10,)
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(d, d2)
    domains = torch.cat([d for _, _, d in first])
    assert set(domains.tolist()) == {0, 1, 2}
    vals = [bytes(t.tolist()) for t in corpus.val]
    for x, y, d in first:
        for row_x, row_y, dom in zip(x.tolist(), y.tolist(), d.tolist()):
            assert bytes(row_x + row_y[-1:]) in vals[dom]


def test_val_windows_do_not_overlap_and_span_the_stream():
    stream = torch.zeros(10_000, dtype=torch.uint8)
    starts = data.val_windows(stream, seq_len=99, max_seqs=64)
    assert len(starts) == 64
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:]))
    assert starts[0] == 0 and starts[-1] + 100 == len(stream)


# -----------------------------------------------------------------------------
# 6. user folders

def test_data_dir_with_subfolders_makes_one_domain_per_subfolder(tmp_path):
    root = tmp_path / "user"
    sizes = {"poems": 0, "recipes": 0}
    for name in sizes:
        (root / name / "more").mkdir(parents=True)
        for i in range(12):
            sub = root / name / ("more" if i % 2 else "")
            text = alphabet_text(b"abc " if name == "poems" else b"xyz\n", 500 + 37 * i, i)
            (sub / f"doc{i}.txt").write_bytes(text)
            sizes[name] += len(text)
    (root / "poems" / ".hidden").write_bytes(b"not part of the corpus" * 100)
    corpus = data.load_corpus(str(root), seq_len=64, log=quiet)
    assert corpus.domains == ["poems", "recipes"]
    for i, name in enumerate(corpus.domains):
        assert len(corpus.train[i]) + len(corpus.val[i]) == sizes[name]
        assert corpus.train_docs[i] + corpus.val_docs[i] == 12


def test_data_dir_with_flat_files_makes_one_domain_per_file(tmp_path):
    texts = {"zeta": alphabet_text(b"zZ ", 30_000, 1), "alpha": os.urandom(25_000)}  # any bytes
    corpus = data.load_corpus(str(write_domains(tmp_path / "user", texts)), seq_len=64, log=quiet)
    assert corpus.domains == ["alpha", "zeta"]
    for i, name in enumerate(corpus.domains):
        assert len(corpus.train[i]) + len(corpus.val[i]) == len(texts[name])
        assert corpus.val_docs[i] >= 1 and corpus.train_docs[i] > corpus.val_docs[i]


def test_chunking_a_file_keeps_every_byte_and_prefers_blank_lines():
    text = b"".join(b"para %d " % i + b"w" * 200 + b"\n\n" for i in range(100))
    chunks = userdata.chunk_text(text, target=1000)
    assert b"".join(chunks) == text
    assert len(chunks) > 10
    assert all(c.endswith(b"\n\n") for c in chunks)
    one_line = b"q" * 10_000  # no paragraph breaks at all
    assert b"".join(userdata.chunk_text(one_line, 1000)) == one_line
    assert len(userdata.chunk_text(one_line, 1000)) >= 5


# -----------------------------------------------------------------------------
# 7. bad input

def assert_one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_data_folder_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(str(tmp_path / "nope"), log=quiet)
    assert_one_line_error(e, "does not exist", "nope")


def test_empty_data_folder_is_a_one_line_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        data.load_corpus(str(tmp_path / "empty"), log=quiet)
    assert_one_line_error(e, "no files")


def test_empty_domain_is_a_one_line_data_error(tmp_path):
    root = write_domains(tmp_path / "user", {"good": alphabet_text(b"ab", 20_000, 0), "blank": b""})
    with pytest.raises(DataError) as e:
        data.load_corpus(str(root), log=quiet)
    assert_one_line_error(e, "'blank'", "no bytes")


def test_domain_shorter_than_one_sequence_is_a_one_line_data_error(tmp_path):
    root = write_domains(tmp_path / "user", {"big": alphabet_text(b"ab", 20_000, 0),
                                             "tiny": alphabet_text(b"cd", 2_000, 1)})
    data.load_corpus(str(root), seq_len=32, log=quiet)  # fine for short sequences
    with pytest.raises(DataError) as e:
        data.load_corpus(str(root), seq_len=1000, log=quiet)
    assert_one_line_error(e, "'tiny'", "seq_len=1000", "bytes")


def test_nonpositive_seq_len_is_a_one_line_data_error(tmp_path):
    root = write_domains(tmp_path / "user", {"a": alphabet_text(b"ab", 20_000, 0)})
    for bad in (0, -5):
        with pytest.raises(DataError) as e:
            data.load_corpus(str(root), seq_len=bad, log=quiet)
        assert_one_line_error(e, "seq_len")
