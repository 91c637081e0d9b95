"""lab/gpu_check.py, proven end to end on the CPU: `--device cpu --quick` runs
every step at toy sizes and writes gpu.json and the table; a step past its
budget is stopped, a failing one recorded, and bad flags are one line. No
timing is asserted (the figures of a toy run mean nothing)."""

import dataclasses
import importlib.util
import json
import math
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import plumbing
from balancers import BALANCERS
from lab import gpu_check

ROOT = Path(__file__).resolve().parent.parent
# python -m lab.gpu_check runs in its own process, which sees the strategies
# the project registers (not the test-only one conftest.py adds in this process).
REGISTERED = {name for name, c in BALANCERS.items() if c.__module__ != "toy_strategy"}
STEPS = ["cuda_tests", "matmul_peak", "moe_vs_dense", "moe_vs_peers", "train_default", "train_gpu"]
PUBLISHED = [ROOT / "results" / "gpu.json", ROOT / "docs" / "gpu.md"]
# The steps below that run in a process of their own run no torch op, so
# they may fork this process: instant, where gpu_check's own forkserver
# would first import torch again (the quick run uses that one).
FORK = multiprocessing.get_context("fork")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def snapshot(paths):
    return {p: p.read_bytes() if p.exists() else None for p in paths}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CPU run for the whole module (20 to 60 s on 2 shared cores, by their load)."""
    out = tmp_path_factory.mktemp("gpu_check")
    before = snapshot(PUBLISHED)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lab.gpu_check", "--device", "cpu", "--quick",
                           "--out", str(out / "out"), "--logs", str(out / "logs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out, time.time() - t0, before


def test_quick_cpu_run_passes_every_step_and_writes_every_figure(quick_run):
    proc, out, seconds, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "out" / "gpu.json").read_text())
    assert set(r) >= {"command", "quick", "date", "device", "budget_s", "steps", "figures", "wall_time_s"}
    assert r["quick"] and r["command"].startswith("python -m lab.gpu_check --device cpu --quick")
    assert r["device"]["device"] == "cpu" and r["device"]["torch"] == torch.__version__
    assert list(r["steps"]) == STEPS
    for name, step in r["steps"].items():
        assert step["status"] == "ok", (name, step)
        assert 0 < step["seconds"] <= step["budget_s"] and (out / "logs" / f"{name}.log").exists()
    assert 0 < r["wall_time_s"] < r["budget_s"] and r["wall_time_s"] < seconds
    tests = r["steps"]["cuda_tests"]["figures"]
    assert tests["returncode"] == 0 and "failed" not in tests["counts"]
    assert tests["counts"].get("skipped" if not torch.cuda.is_available() else "passed", 0) > 0
    f = r["figures"]
    assert positive(f["matmul_peak_tflops"])
    assert set(f["moe_over_dense"]) == REGISTERED and all(positive(v) for v in f["moe_over_dense"].values())
    assert set(f["peer_over_project"]) == {"tiny"} and "mask_loop" in f["peer_over_project"]["tiny"]
    # The peers were compared under bf16 autocast, as on a GPU, and agreed
    # (tests/test_bench.py checks the tolerance).
    assert r["steps"]["moe_vs_peers"]["figures"]["sizes"]["tiny"]["autocast"] == "bf16"
    for name in ("train_default", "train_gpu"):
        run, step = f[name], r["steps"][name]["figures"]
        assert positive(run["tokens_per_s"]) and positive(run["mfu"]) and positive(run["peak_memory_mb"])
        assert step["timed_steps"] == step["steps"] - step["warmup_steps_untimed"] > 0
        # Both runs stop short of their preset's schedule: the full run's time
        # is extrapolated, from the run's own wall time upwards.
        assert run["extrapolated"] and run["full_preset_wall_s"] > step["wall_time_s"] > 0
    assert r["steps"]["train_gpu"]["figures"]["preset"] == "gpu"
    assert r["steps"]["train_gpu"]["figures"]["preset_steps"] == 2000


def test_quick_cpu_run_writes_the_table_and_leaves_results_and_docs_alone(quick_run):
    proc, out, _, before = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "out" / "gpu.md").read_text()
    for row in ("| device |", "| torch, CUDA |", "| CUDA tests |", "| matmul peak |", "| MoE/dense layer time",
                "| peer/project layer time, tiny size |", "| tiny preset |", "| gpu preset |", "Total wall time"):
        assert row in table, row
    assert "toy sizes" in table and "every step ok" in table
    if importlib.util.find_spec("transformers") is None:   # said in one line, and in the table
        assert "| Hugging Face peers | transformers is not installed" in table
        assert "moe_vs_peers   ok" in proc.stdout and "Hugging Face peers skipped" in proc.stdout
    assert table in proc.stdout                      # printed as well
    assert snapshot(PUBLISHED) == before


def test_the_table_of_a_gpu_run_with_failed_steps_still_renders(quick_run):
    """The table is written after every step, whatever they did: a GPU's
    rows, and a step that overran or failed shows its status and error
    instead of figures (and the rows that depend on it say n/a)."""
    proc, out, _, _ = quick_run
    r = json.loads((out / "out" / "gpu.json").read_text())
    r["device"].update(device="cuda", name="NVIDIA H200", capability="9.0", memory_gib=139.8, cuda="12.8")
    r["steps"]["matmul_peak"] = {"status": "overran", "seconds": 30.0, "budget_s": 30.0, "error": "stopped"}
    r["steps"]["train_gpu"] = {"status": "failed", "seconds": 3.0, "budget_s": 90.0, "error": "ValueError: boom"}
    r["figures"] = gpu_check.figures(r["steps"])
    table = gpu_check.table(r)
    assert "| device | NVIDIA H200, compute capability 9.0, 140 GiB |" in table
    assert "| matmul peak | n/a |" in table and "| train_gpu | failed: ValueError: boom |" in table
    assert "| tiny preset |" in table and "| n/a |" in table          # no peak: no MFU
    assert "not ok: matmul_peak overran, train_gpu failed." in table


def train_default(plan, device, logs):
    """Stands in for gpu_check.train_default: a run that outlives its budget
    (the step's name picks its budget and the log it is read from)."""
    time.sleep(120)


def test_a_run_past_its_budget_is_stopped_recorded_as_overran_and_keeps_its_logged_rate(tmp_path):
    """The step is killed at its budget and the next one may start; what its
    log.jsonl holds by then still gives the rate: 10 steps of the quick
    plan's tiny run (512 tokens each), 3 slow warm-up ones left out, then 7
    of 0.1 s each, and the torn line of the step it was writing."""
    (tmp_path / "train_default").mkdir()
    rates = [100.0] * 3 + [5120.0] * 7
    (tmp_path / "train_default" / "log.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "tokens_per_s": r}) + "\n" for i, r in enumerate(rates))
        + '{"step": 11, "tokens_p')                      # killed in the middle of writing a line
    plan = dataclasses.replace(gpu_check.QUICK, budgets={**gpu_check.QUICK.budgets, "train_default": 1})
    t0 = time.time()
    record = gpu_check.run_step(FORK, train_default, plan, "cpu", tmp_path, t0 + 100)
    assert time.time() - t0 < 60
    assert record["status"] == "overran" and "1 s budget" in record["error"]
    run = record["figures"]
    assert run["partial"] and run["steps"] == 10 and run["timed_steps"] == 7
    assert run["tokens_per_s"] == pytest.approx(5120) and run["step_ms_median"] == pytest.approx(100)
    steps = {name: {"status": "skipped"} for name in STEPS}
    steps.update(matmul_peak={"status": "ok", "figures": {"flops_median": 1e9}}, train_default=record)
    mfu = gpu_check.figures(steps)["train_default"]["mfu"]
    assert mfu == pytest.approx(5120 * run["flops_per_token"] / 1e9)


def test_a_failing_step_is_recorded_with_its_error_in_one_line(tmp_path):
    status, figures, error = gpu_check.run_isolated(FORK, int, ("x",), 120, tmp_path / "f.log")
    assert status == "failed" and figures is None
    assert error.startswith("ValueError: invalid literal") and "\n" not in error
    assert "Traceback" in (tmp_path / "f.log").read_text()      # the whole story is in the step's log


def test_a_step_with_no_time_left_is_skipped_without_starting(tmp_path):
    record = gpu_check.run_step(None, gpu_check.matmul_peak, gpu_check.QUICK, "cpu", tmp_path, time.time() - 1)
    assert record["status"] == "skipped" and record["seconds"] == 0 and not list(tmp_path.iterdir())


def test_the_docs_table_is_replaced_between_its_markers_only(tmp_path):
    doc = tmp_path / "gpu.md"
    doc.write_text(f"# prose before\n{gpu_check.TABLE_BEGIN}\nold table\n{gpu_check.TABLE_END}\nprose after\n")
    gpu_check.write_docs_table("| new | table |\n", doc)
    assert doc.read_text() == (f"# prose before\n{gpu_check.TABLE_BEGIN}\n| new | table |\n"
                               f"{gpu_check.TABLE_END}\nprose after\n")
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="no table markers"):
        gpu_check.write_docs_table("| new |\n", doc)


BAD_FLAGS = {
    "unknown flag": ["--bogus"],
    "zero budget": ["--device", "cpu", "--quick", "--budget", "0"],
    "NaN budget": ["--device", "cpu", "--quick", "--budget", "nan"],
    "full check on a CPU": ["--device", "cpu"],
    "quick figures over results/": ["--device", "cpu", "--quick", "--out", str(ROOT / "results")],
}
if not torch.cuda.is_available():
    BAD_FLAGS["--device cuda without a GPU"] = ["--device", "cuda"]
    BAD_FLAGS["no flags without a GPU"] = []


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line_and_exit_code_2(case, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        plumbing.cli(lambda: gpu_check.main(BAD_FLAGS[case]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
