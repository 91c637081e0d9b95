"""
End-to-end tests of train.py: the command a reader types first.

Single-process runs call train.main() in this process (fast); multi-process
runs go through torchrun exactly as a user would. All runs use the tiny preset.
"""

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lab import compare
import plumbing
import train
from balancers import BALANCERS
from moe import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def torchrun(out, *flags, nproc=2, timeout=240, wait=True, script="train.py"):
    """Launch `torchrun --nproc_per_node=N train.py --preset tiny ...` like a user."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone",
           script, "--preset", "tiny", "--out", str(out), *flags]
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


@pytest.mark.parametrize("balancer", list(BALANCERS))
def test_resume_continues_the_same_loss_curve_and_state_bitwise(tmp_path, balancer):
    """N steps, stop, resume to N+M == N+M uninterrupted steps, exactly, in one
    process, for every registered strategy: model, optimizer, the strategy's
    state (state(): lossfree's bias, any buffer a new strategy registers) and
    the data position all come back."""
    full = run_inprocess(tmp_path / "full", "--steps", "6", "--balancer", balancer)
    assert train.main(["--preset", "tiny", "--out", str(tmp_path / "cut"), "--steps", "6", "--stop-at", "3",
                       "--balancer", balancer]) == 0
    assert len(read_log(tmp_path / "cut")) == 3
    resumed = run_inprocess(tmp_path / "cut", "--steps", "6", "--resume", "--balancer", balancer)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r.get("state") for r in resumed] == [r.get("state") for r in full]
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "cut")]
    assert summaries[0]["state"] == summaries[1]["state"]
    assert summaries[0]["state"].keys() == BALANCERS[balancer](4, 2, plumbing.strategy_settings(
        train.parse_args(["--balancer", balancer]))).state().keys()


def test_a_strategy_added_in_one_class_reaches_every_part_of_the_project(tmp_path):
    """The README's promise for a fifth strategy, checked with the test-only
    `toy_ema` (tests/toy_strategy.py: one class, one registration line): it is
    a --balancer choice with its summary in --help, a run of the comparison,
    its state (`ema`, not `bias`) is logged and in summary.json, and it
    survives a resume bit for bit (test above); the causality and 2-rank
    tests take it from the registry too."""
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        train.parse_args(["--help"])
    parser_help = out.getvalue()
    squeeze = lambda text: "".join(text.split())                     # --help wraps lines anywhere
    assert squeeze(f"toy_ema: {BALANCERS['toy_ema'].summary}") in squeeze(parser_help)
    assert train.parse_args(["--balancer", "toy_ema"]).balancer == "toy_ema"
    assert "toy_ema" in compare.Plan("smoke", ["--preset", "tiny"]).seeds
    records = run_inprocess(tmp_path, "--balancer", "toy_ema", "--steps", "3")
    assert len(records[-1]["state"]["ema"]) == 2                     # one row per layer
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"]["ema"] == records[-1]["state"]["ema"] and any(any(row) for row in summary["state"]["ema"])


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


CRASHER = """
import sys
sys.path.insert(0, {root!r})
import plumbing, train
real_step = train.train_step

def crashing_step(model, opt, corpus, step, args, proc):
    if proc.rank == 1 and step == 2:
        raise RuntimeError("forced failure on rank 1")
    return real_step(model, opt, corpus, step, args, proc)

train.train_step = crashing_step
plumbing.cli(train.main)
"""


def test_a_failing_rank_ends_the_whole_run(tmp_path):
    """If rank 1 raises, the run must exit non-zero promptly, not hang in a collective."""
    script = tmp_path / "crash.py"
    script.write_text(CRASHER.format(root=ROOT))
    start = time.time()
    res = torchrun(tmp_path / "out", "--steps", "500", timeout=180, script=str(script))
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
        plumbing.cli(train.main)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--balancer", "nope"], "registered are none, aux"),
    (["--balancer", "nope"], "--import FILE"),
    (["--import", "no_such_file.py"], "--import no_such_file.py: no such file"),
    (["--balancer", "toy_ema", "--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--top-k", "9"], "top_k"),
    (["--batch-size", "7", "--grad-accum", "2"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "10000000"], "--seq-len"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "-5"], "--steps"),
    (["--capacity-factor", "0", "--balancer", "expert_choice"], "--capacity-factor"),
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


def test_a_nan_step_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A learning rate of 1e6 from step 4 on makes the weights explode: the
    run stops with a message naming the last good checkpoint, and that
    checkpoint -- parameters, optimizer moments and strategy state -- is
    finite. (The loss stays finite for a step after the gradients turn NaN:
    checking the loss is not enough.) The schedule is patched rather than
    --lr changed, since --resume refuses a changed --lr."""
    run_inprocess(tmp_path, "--steps", "60", "--stop-at", "4")
    monkeypatch.setattr(train, "lr_at", lambda step, args: 1e6)
    with pytest.raises(FloatingPointError, match="last good state"):
        train.main(["--preset", "tiny", "--out", str(tmp_path), "--steps", "60", "--eval-every", "2", "--resume"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] >= 4
    whole = plumbing.checkpoint_tensors(tmp_path)
    tensors = list(whole["model"].values()) + [v for s in whole["optimizer"].values() for v in s.values()]
    assert tensors
    assert all(torch.isfinite(v).all() for v in tensors if torch.is_tensor(v) and v.is_floating_point())


SAVER = """
import dataclasses, sys, torch
sys.path.insert(0, {root!r})
import plumbing, train
args = train.parse_args(["--preset", "default", "--out", {out!r}])
proc = plumbing.Proc()
model, opt = train.build(args, proc)
print("ready", flush=True)
step = 0
while True:
    step += 1
    plumbing.save_checkpoint({path!r}, model, opt, step, {{"config": dataclasses.asdict(plumbing.model_config(args))}}, proc)
"""


def test_killing_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """The step folder is complete before the index (written to a temporary
    file and renamed) names it, and the previous folder goes only after
    that: SIGKILL in the middle of a save must leave an index whose folder
    is whole -- every file there, every sha256 right -- and loads."""
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
        model, ckpt = plumbing.load_model(path)
        assert ckpt["step"] >= 1 and sum(p.numel() for p in model.parameters()) > 0


# ----------------------------------------------------------------------------
# The measurements themselves.

def test_specialisation_is_zero_when_domains_share_experts_and_high_when_they_split_them():
    """Qiu et al. 2025, Fig. 1b, as one number: the distance between each
    domain's expert distribution and the all-domain average. Domains using
    the experts alike score 0 -- also when the router collapsed onto one
    expert (imbalance is not specialisation); two domains on disjoint halves
    of the experts score 0.5."""
    alike = torch.full((1, 2, 4), 0.25)
    collapsed = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]])
    split = torch.tensor([[[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]])
    assert train.specialization_score(alike) == 0
    assert train.specialization_score(collapsed) == 0
    assert train.specialization_score(split) == pytest.approx(0.5)


@pytest.mark.parametrize("preset", list(train.PRESETS))
def test_every_preset_is_a_valid_model_for_one_and_two_processes(preset):
    """The gpu preset cannot be run here, but its shape must pass the same
    checks (heads divide the width, experts divide over 2 processes, the
    balance and routing groups divide the micro-batch)."""
    args = train.parse_args(["--preset", preset])
    for world_size in (1, 2):
        check_config(plumbing.model_config(args), world_size, local_seqs=args.batch_size // world_size)


def test_the_run_prints_each_evaluation_and_judges_the_final_loss_against_the_unigram(tmp_path, capsys):
    """A learner watches the terminal, not log.jsonl: every evaluation during
    training prints one line with its figures, the bar names what it shows,
    and the end says in words whether the model beats the unigram baseline."""
    records = run_inprocess(tmp_path / "run", "--steps", "6", "--eval-every", "3")
    out = capsys.readouterr()
    text = out.out + out.err
    evals = [r for r in records if "val_loss" in r]
    line = plumbing.evaluation_line(3, evals[0])
    assert line in text and f"{evals[0]['val_loss']:.4f}" in line and "MaxVio_global" in line
    assert "train loss" in text and "MaxVio_batch" in text            # the bar's fields are labelled
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    verdict = plumbing.against_unigram(summary["val_loss"], summary["unigram_loss"], 6)
    assert verdict in text
    assert ("worse than the unigram" in verdict) == (summary["val_loss"] >= summary["unigram_loss"])
    assert "beats the unigram" in plumbing.against_unigram(1.0, 2.0, 10)


def toy_model_and_batches(balancer, **balance):
    """A two-layer toy model (untrained) and three validation batches of 4
    sequences; enough for the evaluation's arithmetic."""
    from moe import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=16, n_layers=2, d_model=16, n_heads=2, n_experts=4, top_k=2,
                    d_expert=8, balancer=balancer, balance=dict(**balance))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 32, (4, 16), generator=g), torch.randint(0, 32, (4, 16), generator=g),
                torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    return GPT(cfg).eval(), batches


def test_computation_batch_maxvio_falls_on_a_hand_worked_load():
    """Wang et al. 2024, Sec. 5.1: sequences that each lean to one expert are
    imbalanced one by one, balanced in pairs. Loads (2, 0), (0, 2), (2, 0),
    (0, 2): MaxVio 1 at S = 1, 0 at S = 2 and at S = 4."""
    load = torch.tensor([[[2, 0], [0, 2], [2, 0], [0, 2]]])
    assert train.computation_batch_maxvio(load) == {"sizes": [1, 2, 4], "maxvio": [1.0, 0.0, 0.0]}
    three = train.computation_batch_maxvio(load[:, :3])          # 3 sequences: S = 1, 2, then the whole set
    assert three["sizes"] == [1, 2, 3] and three["maxvio"][2] == pytest.approx(1 / 3)


def test_computation_batches_draw_sequences_in_random_order_not_the_validation_round_robin():
    """The validation set alternates domains; if each domain leans to its own
    expert, consecutive pairs are balanced by construction and MaxVio would
    "fall" at S = 2 for no reason a training batch shares. In a random order
    the pairs are sometimes of one domain, as in a training batch."""
    load = torch.tensor([[[2, 0], [0, 2]] * 8])                       # domains a, b, a, b, ...
    assert train.computation_batch_maxvio(load)["maxvio"][1] == 0.0
    assert train.computation_batch_maxvio(load, seed=0)["maxvio"][1] > 0.0


@pytest.mark.parametrize("balancer", list(BALANCERS))
def test_computation_batch_maxvio_at_the_whole_set_equals_maxvio_global(balancer):
    model, batches = toy_model_and_batches(balancer)
    corpus = type("Corpus", (), {"domains": ["a", "b"]})()
    ev = train.evaluate(model, corpus, batches, plumbing.Proc())
    curve = ev["maxvio_computation_batch"]
    assert curve["sizes"] == [1, 2, 4, 8, 12]
    assert curve["maxvio"][-1] == pytest.approx(ev["maxvio_global"], rel=1e-6)
    assert curve["maxvio"][0] > curve["maxvio"][-1]


@pytest.mark.parametrize("balancer", [n for n, c in BALANCERS.items() if c.token_choice])
def test_causal_evaluation_equals_teacher_forcing_to_rounding_for_token_choice(balancer):
    """Token choice routes each token on its own, so computing position t
    from its prefix alone changes nothing but rounding. Not to the last bit:
    a forward of t + 1 positions and one of T positions may use matmul and
    attention kernels that round differently (PyTorch 2.14 does, 2.13 does
    not), so the bound is a stated one, CAUSAL_ROUNDING, far below any leak
    (expert choice's gap is ~1e-2). The exact property, equal-length
    forwards that differ only in the future, is the causality probe's
    (test_moe.py)."""
    model, batches = toy_model_and_batches(balancer)
    ev = train.causal_evaluation(model, batches, plumbing.Proc())
    assert math.isclose(ev["val_loss_causal"], ev["val_loss_forced_same_windows"], rel_tol=CAUSAL_ROUNDING, abs_tol=0)
    assert ev["causal_windows"] == 12


# Relative difference allowed between a loss computed from prefixes and from
# whole windows: float32 rounding of a mean over ~1e3 tokens is ~1e-7.
CAUSAL_ROUNDING = 1e-6


@pytest.mark.parametrize("route_seqs", [1, 2])
def test_causal_evaluation_differs_from_teacher_forcing_for_expert_choice(route_seqs):
    """Expert choice's teacher-forced routing sees the future of the group;
    the causal evaluation does not, so the two losses differ, and evaluate()
    reports the causal one for every expert-choice model."""
    model, batches = toy_model_and_batches("expert_choice", route_seqs=route_seqs)
    ev = train.causal_evaluation(model, batches, plumbing.Proc())
    assert ev["val_loss_causal"] != ev["val_loss_forced_same_windows"]
    corpus = type("Corpus", (), {"domains": ["a", "b"]})()
    full = train.evaluate(model, corpus, batches, plumbing.Proc())
    assert full["val_loss_causal"] == ev["val_loss_causal"]


def test_two_torchrun_nodes_of_two_processes_equal_one_node_of_four(tmp_path):
    """Multi-node as docs/scaling.md launches it: two torchrun launchers on
    this machine stand for two nodes (--nnodes 2, a fixed node rank each, one
    rendezvous address), 2 processes each. The run is the same as 4
    processes on one node: the same losses and validation figures, bit for
    bit, since the ranks, the global batches and the sums are the same."""
    one = torchrun(tmp_path / "one", "--steps", "3", "--n-experts", "8", nproc=4)
    assert one.returncode == 0, one.stderr[-2000:]
    port = plumbing.free_port()

    def node(rank):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                                 "--nproc_per_node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
                                 "train.py", "--preset", "tiny", "--steps", "3", "--n-experts", "8",
                                 "--out", str(tmp_path / "two")],
                                cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    nodes = [node(0), node(1)]
    errs = [n.communicate(timeout=240)[1] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), errs[0][-2000:] + errs[1][-2000:]
    assert [r["loss"] for r in read_log(tmp_path / "one")] == [r["loss"] for r in read_log(tmp_path / "two")]
    a, b = (json.load(open(tmp_path / run / "summary.json")) for run in ("one", "two"))
    assert a["world_size"] == b["world_size"] == 4
    assert (a["val_loss"], a["maxvio_global"]) == (b["val_loss"], b["maxvio_global"])
