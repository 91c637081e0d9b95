"""
End-to-end tests of train.py: the command a reader types first.

Single-process runs call train.main() in this process (fast); multi-process
runs go through torchrun exactly as a user would. All runs use the tiny preset.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from balancers import BALANCERS  # noqa: E402

SUMMARY_KEYS = {"balancer", "steps", "world_size", "val_loss", "val_ppl", "val_loss_by_domain",
                "maxvio_global", "maxvio_batch", "specialization", "causal_leak", "tokens_per_second"}


def run_inprocess(out, *flags):
    """train.main with the tiny preset; returns the logged records."""
    code = train.main(["--preset", "tiny", "--out", str(out), *flags])
    assert code == 0
    return read_log(out)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(out, *flags, nproc=2, timeout=240, wait=True):
    """Launch `torchrun --nproc_per_node=N train.py --preset tiny ...` like a user."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone",
           "train.py", "--preset", "tiny", "--out", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(records):
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


# ----------------------------------------------------------------------------
# It trains, and it reports what the papers measure.

def test_tiny_run_lowers_the_loss(tmp_path):
    """Twenty steps of the tiny preset must learn something."""
    records = run_inprocess(tmp_path, "--steps", "20")
    assert len(records) == 20
    assert records[-1]["loss"] < records[0]["loss"] - 1.0


@pytest.mark.parametrize("balancer", list(BALANCERS))
def test_every_strategy_writes_the_summary_schema(tmp_path, balancer):
    """summary.json carries the figures the comparison and users rely on."""
    run_inprocess(tmp_path, "--balancer", balancer, "--steps", "3")
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["balancer"] == balancer and summary["steps"] == 3 and summary["world_size"] == 1
    assert set(summary["val_loss_by_domain"]) == set(summary["domains"])
    assert (tmp_path / "ckpt.pt").exists()
    leak = summary["causal_leak"]
    assert (leak > 0) if balancer == "expert_choice" else (leak == 0)


def test_resume_continues_the_same_loss_curve_bitwise(tmp_path):
    """N steps, stop, resume to N+M == N+M uninterrupted steps, exactly, in one
    process: model, optimizer, strategy state (the lossfree bias) and data
    position all come back."""
    full = run_inprocess(tmp_path / "full", "--steps", "8")
    assert train.main(["--preset", "tiny", "--out", str(tmp_path / "cut"), "--steps", "8", "--stop-at", "4"]) == 0
    assert len(read_log(tmp_path / "cut")) == 4
    resumed = run_inprocess(tmp_path / "cut", "--steps", "8", "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert resumed[-1]["bias"] == full[-1]["bias"]


def test_grad_accum_gives_the_same_loss_curve(tmp_path):
    """--grad-accum only splits the global batch, so the curve must not move."""
    one = run_inprocess(tmp_path / "a", "--steps", "4")
    two = run_inprocess(tmp_path / "b", "--steps", "4", "--grad-accum", "2")
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------
# Several processes, through torchrun.

def test_two_process_run_matches_one_process_and_resumes(tmp_path):
    """Same seed, same global batch: 1 process and 2 expert-parallel processes
    trace the same loss curve; a 2-process run stopped and resumed continues it."""
    one = run_inprocess(tmp_path / "one", "--steps", "6", "--balancer", "lossfree")
    res = torchrun(tmp_path / "two", "--steps", "6", "--balancer", "lossfree")
    assert res.returncode == 0, res.stderr[-2000:]
    two = read_log(tmp_path / "two")
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-4, atol=0)
    with open(tmp_path / "two" / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and SUMMARY_KEYS <= summary.keys()

    res = torchrun(tmp_path / "cut", "--steps", "6", "--balancer", "lossfree", "--stop-at", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    res = torchrun(tmp_path / "cut", "--steps", "6", "--balancer", "lossfree", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    torch.testing.assert_close(losses(read_log(tmp_path / "cut")), losses(two), rtol=1e-5, atol=0)


def test_a_failing_rank_ends_the_whole_run(tmp_path):
    """If rank 1 raises, the run must exit non-zero promptly, not hang in a collective."""
    start = time.time()
    res = torchrun(tmp_path, "--steps", "500", "--crash-rank", "1", "--crash-step", "2", timeout=180)
    assert res.returncode != 0
    assert "forced failure on rank 1" in res.stderr
    assert time.time() - start < 120


def test_sigterm_to_the_launcher_keeps_a_resumable_checkpoint(tmp_path):
    """Stopping a 2-process run (SIGTERM to torchrun) leaves a usable checkpoint,
    and --resume finishes the run from it."""
    proc = torchrun(tmp_path, "--steps", "100000", "--log-every", "1", wait=False)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    assert log.exists(), "the run never started"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, first_err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the launcher did not stop within 90 s of SIGTERM")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] >= 3
    res = torchrun(tmp_path, "--steps", str(ckpt["step"] + 2), "--log-every", "1", "--resume")
    assert res.returncode == 0, f"interrupted run:\n{first_err[-1500:]}\nresumed run:\n{res.stderr[-2500:]}"
    assert [r["step"] for r in read_log(tmp_path)][-1] == ckpt["step"] + 2


# ----------------------------------------------------------------------------
# Robustness: bad input, non-finite loss, interrupted saves.

def cli_error(capsys, monkeypatch, *argv):
    """Run the command-line entry point; return (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exc:
        train.cli()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--balancer", "nope"], "invalid choice"),
    (["--top-k", "9"], "top_k"),
    (["--batch-size", "7", "--grad-accum", "2"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "10000000"], "seq_len"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "-5"], "--steps"),
    (["--capacity-factor", "0", "--balancer", "expert_choice"], "capacity_factor"),
    (["--balancer", "aux", "--balance-seqs", "3"], "--balance-seqs"),
    (["--n-heads", "5"], "n_heads"),
])
def test_bad_flags_give_one_line_and_status_2(tmp_path, capsys, monkeypatch, flags, words):
    """A classroom's first typos: exit 2, one line naming the problem, no traceback."""
    code, err = cli_error(capsys, monkeypatch, "--preset", "tiny", "--out", str(tmp_path / "o"), *flags)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err


def test_bad_data_folder_and_resume_give_one_line(tmp_path, capsys, monkeypatch):
    """--data missing / empty / with an empty domain; --resume with no, a corrupt,
    or a different-shape checkpoint; an --out that cannot be written."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "b").mkdir()
    (tmp_path / "hollow" / "a" / "x.txt").write_text("hello " * 2000)
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "run"
    out.mkdir()
    cases = [(["--data", str(tmp_path / "missing")], "missing"),
             (["--data", str(tmp_path / "empty")], "empty"),
             (["--data", str(tmp_path / "hollow")], "'b'"),
             (["--resume"], "no checkpoint"),
             (["--out", str(tmp_path / "afile" / "sub")], "cannot be written")]
    for flags, words in cases:
        code, err = cli_error(capsys, monkeypatch, "--preset", "tiny", "--out", str(out), *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err.lower(), (flags, err)
    (out / "ckpt.pt").write_bytes(b"garbage")
    code, err = cli_error(capsys, monkeypatch, "--preset", "tiny", "--out", str(out), "--resume")
    assert code == 2 and "not a readable checkpoint" in err
    code, err = cli_error(capsys, monkeypatch, "--preset", "tiny", "--out", str(out))
    assert code == 2 and "already exists" in err
    assert (out / "ckpt.pt").read_bytes() == b"garbage"          # never clobbered
    run_inprocess(tmp_path / "small", "--steps", "2")
    code, err = cli_error(capsys, monkeypatch, "--preset", "tiny", "--out", str(tmp_path / "small"),
                          "--resume", "--d-model", "32")
    assert code == 2 and "different model" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss ends the run with a clear message; the checkpoint on disk is
    the last good one, not the poisoned state."""
    real_step = train.train_step

    def poisoned(model, opt, corpus, step, *rest):
        rec = real_step(model, opt, corpus, step, *rest)
        if step == 3:
            rec["loss"] = float("nan")
        return rec
    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="last good"):
        train.main(["--preset", "tiny", "--out", str(tmp_path), "--steps", "10", "--eval-every", "2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
import train
from moe import GPT
args = train.parse_args(["--preset", "default", "--out", {out!r}])
torch.manual_seed(0)
model = GPT(train.model_config(args))
opt = train.make_optimizer(model, args)
print("ready", flush=True)
step = 0
while True:
    step += 1
    train.save_checkpoint({path!r}, model, opt, step, args, 0, 1)
"""


def test_killing_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """Checkpoints are written to a temporary file and renamed: SIGKILL in the
    middle of a save must leave a loadable checkpoint behind."""
    path = str(tmp_path / "ckpt.pt")
    script = SAVER.format(root=ROOT, out=str(tmp_path), path=path)
    for delay in (1.0, 1.37, 1.71):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["step"] >= 1 and "model" in ckpt
