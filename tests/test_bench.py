"""Smoke test of lab/bench.py: it runs end to end on the tiny preset and writes
every figure the README's Speed section quotes. No timing is asserted (the
figures depend on the machine and on what else runs on it)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from balancers import BALANCERS

# python -m lab.bench runs in its own process, which sees the strategies
# the project registers (not the test-only one conftest.py adds in this process).
REGISTERED = {name for name, c in BALANCERS.items() if c.__module__ != "toy_strategy"}

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path, *flags, expect=("MoE/dense", "MFU")):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "lab.bench", "--preset", "tiny", "--repeats", "2", "--warmup", "0",
                           "--threads", "2", "--json", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(word in proc.stdout for word in expect), proc.stdout[-3000:]
    return json.loads(out.read_text())


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_writes_every_figure(tmp_path):
    r = run_bench(tmp_path)
    assert set(r["moe_over_dense"]) == REGISTERED
    assert all(positive(v) for v in r["moe_over_dense"].values())
    assert all(positive(x["routing_over_dense"]) and positive(x["experts_over_dense"]) for x in r["layers"].values())
    assert 0 < r["mfu"] and positive(r["train_step"]["matmul_peak_gflops"])
    assert positive(r["ep2_over_ep1"]) and 0 <= r["all_to_all_share"] <= 1
    assert set(r["experts_scaling"]) == {"8", "16", "64"}
    assert all(positive(x["step_ms"]) for x in r["experts_scaling"].values())
    assert len(r["tokens_scaling"]) >= 3 and all(positive(x["tokens_per_s"]) for x in r["tokens_scaling"].values())
    mem = r["peak_memory_mb"]
    assert positive(mem["train_step_1_process"]) and len(mem["train_step_2_processes"]) == 2
    assert positive(mem["bench_process"])
    assert r["machine"]["threads"] == 2 and r["command"].startswith("python -m lab.bench --preset tiny")
    assert set(r["headline"]) == {"moe_over_dense_worst_token_choice", "mfu", "ep2_over_ep1", "experts_64_over_8"}


def test_bench_quick_writes_the_headline_figures(tmp_path):
    r = run_bench(tmp_path, "--quick")
    assert set(r["headline"]) == {"moe_over_dense_worst_token_choice", "mfu"}
    assert set(r["moe_over_dense"]) == REGISTERED and 0 < r["mfu"]
    assert "ep2_over_ep1" not in r


def test_bench_peers_compares_with_a_mask_loop_and_hugging_face_when_installed(tmp_path):
    """--peers times the layer against the textbook mask loop always, and
    against Hugging Face's Qwen3-MoE block when transformers is installed
    (else it says in one line that it skipped them). Every peer held the
    project's weights and gave the same outputs."""
    r = run_bench(tmp_path, "--peers", expect=("peer", "mask_loop"))
    assert set(r["peers"]) == {"tiny"}          # the large size is left out for the tiny preset
    tiny = r["peers"]["tiny"]
    assert positive(tiny["project_ms"]) and tiny["config"]["tokens"] == 8 * 64
    hf = {"hf_qwen3_moe_eager", "hf_qwen3_moe_grouped_mm"}
    if importlib.util.find_spec("transformers") is None:
        assert set(tiny["against"]) == {"mask_loop"} and "transformers" in r["peers_skipped"]
    else:
        assert set(tiny["against"]) == {"mask_loop"} | hf and "peers_skipped" not in r
    for peer in tiny["against"].values():
        assert positive(peer["peer_over_project"]) and positive(peer["ms"])
        assert 0 <= peer["max_rel_diff"] <= 1e-4
    assert set(r["headline"]) == {"peer_over_project_worst"}
    assert "moe_over_dense" not in r["targets"]


def test_peers_route_like_the_project_under_cpu_bf16_autocast():
    """Under bf16 autocast (here the CPU's, as in lab.gpu_check's dry run) every
    peer's router runs in fp32 like the project's, so all pick the same
    experts and the outputs differ by bf16 rounding only (a few parts in a
    thousand of the largest value). A peer routing in bf16 picks other
    experts for some tokens and differs by more than half of it."""
    from lab import bench
    import torch
    r, _ = bench.bench_peers(bench.peer_sizes("tiny"), warmup=0, repeats=1, device=torch.device("cpu"), bf16=True)
    assert r["tiny"]["autocast"] == "bf16"
    for name, peer in r["tiny"]["against"].items():
        assert 0 < peer["max_rel_diff"] <= 2e-2, (name, peer)      # > 0: bf16 did round


def test_grouped_vs_loop_times_both_ways_and_reports_the_rules_pick():
    """The measurements behind the CPU experts' rule (plumbing.kernels), on one small shape: both
    ways timed, the rule's pick named, and its cost over the faster way >= 1."""
    from lab import bench
    from plumbing.kernels import grouped_mm_on_cpu
    if not grouped_mm_on_cpu():
        pytest.skip("torch._grouped_mm does not run on this CPU build: there is only the loop")
    r = bench.bench_grouped_vs_loop([(16, 4, 2, 8, 64)], warmup=0, repeats=2)
    x = r["d16_e4_top2_h8_t64"]
    assert x["rows_per_expert"] == 32 and x["block"] == 32 * 8
    assert positive(x["loop_ms"]) and positive(x["grouped_ms"]) and positive(x["loop_over_grouped"])
    assert x["rule_picks"] == "grouped"          # 256 values per block: far under one thread's share
    assert x["rule_over_best"] >= 1.0


def test_no_rank_holds_more_than_its_own_experts_while_saving_or_resuming():
    """4 processes at ep 4, each holding a quarter of 144 MB of expert state
    (weights and AdamW moments): while saving and while resuming, no rank's
    resident memory rises by half of all experts' state. Gathering the
    experts onto rank 0 to write one file would raise rank 0's by all of it."""
    from lab import bench
    cases = [c for c in bench.CKPT_CASES if c[0] in ("save 4 ranks ep 4", "resume 4 ranks ep 4")]
    r = bench.bench_checkpoint_memory(cases)
    whole = r["all_expert_state_mb"]
    assert whole > 100
    for name, ranks in r["runs"].items():
        assert len(ranks) == 4
        for x in ranks:
            assert x["own_expert_state_mb"] == pytest.approx(whole / 4)
            assert 0 <= x["rise_mb"] < whole / 2, (name, x)
