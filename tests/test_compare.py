"""compare.py: the whole comparison runs end to end at toy size and writes
results.json, results.md and every plot; it keeps finished runs; each claim's
arms differ only in what the paper varied; and the verdict rule follows the
numbers, three ways.

The end-to-end test trains every run of the plan for 3 steps with one seed
(`--smoke`), in a subprocess so that train.py's signal handlers and torch's
thread setting stay out of the test process."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import train
from balancers import BALANCERS

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = {"holds", "contradicted", "unresolved"}


def run_compare(*flags):
    return subprocess.run([sys.executable, str(ROOT / "compare.py"), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = run_compare("--smoke", "--jobs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_smoke_writes_results_json_results_md_and_every_plot(smoke):
    out, _ = smoke
    res = json.loads((out / "results.json").read_text())
    text = (out / "results.md").read_text()
    assert res["val_windows_per_domain"] == compare.SIZES["smoke"]["val_seqs"] and res["wall_time_s"] > 0
    assert len(res["plots"]) == len(compare.PLOTS)
    assert {c["key"] for c in res["claims"]} == {c.key for c in compare.claims("smoke")}
    for png in res["plots"]:
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in text, f"{png} is not linked from results.md"
    for run in res["runs"]:
        assert run["flags"][-2:] == ["--seed", str(run["seed"])] and "val_loss" in run["summary"]
    judged = [c for c in res["claims"] if c["verdict"]]
    assert len(judged) == 6
    for claim in judged:
        assert claim["verdict"] in VERDICTS and claim["parts"]
        for part in claim["parts"]:
            assert part["verdict"] in VERDICTS
            if part["metric"] != "causal_leak":
                assert {"diff", "ci_low", "ci_high", "unit"} <= part.keys() and part["seeds"] == 1
    # One seed gives no noise estimate: no statistical part may be judged.
    assert all(p["verdict"] == "unresolved" for c in judged for p in c["parts"] if "diff" in p)


def test_smoke_runs_the_within_model_shuffle_test_of_expert_choice(smoke):
    """Wang et al.'s control, within one model: every expert-choice run is
    evaluated with whole-sequence and with shuffled routing groups."""
    out, _ = smoke
    res = json.loads((out / "results.json").read_text())
    ec = [r for r in res["runs"] if "expert_choice" in r["flags"]]
    assert ec and all("shuffle_cost" in r["metrics"] for r in ec)
    assert all("shuffle_cost" not in r["metrics"] for r in res["runs"] if r not in ec)


def test_finished_runs_are_kept(smoke):
    out, first = smoke
    some = next((out / "runs").iterdir()) / "summary.json"
    stamp = some.stat().st_mtime_ns
    again = run_compare("--smoke", "--jobs", "1", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training 0 with" in again.stdout
    assert some.stat().st_mtime_ns == stamp


def test_reuse_copies_finished_runs_from_another_folder_and_says_so(smoke, tmp_path):
    """Adding seeds in a new folder need not retrain the seeds already done;
    the new results.md then says how many runs that invocation trained, so
    its wall time does not read as the whole comparison's."""
    out, _ = smoke
    new = tmp_path / "more"
    proc = run_compare("--smoke", "--jobs", "1", "--out", str(new), "--reuse", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = len(list((out / "runs").iterdir()))
    assert f"{n} copied from" in proc.stdout and "training 0 with" in proc.stdout
    assert f"(it trained 0 runs; {n} had finished earlier)" in (new / "results.md").read_text()
    json.loads((new / "results.json").read_text(), parse_constant=pytest.fail)   # strict JSON: no NaN
    bad = run_compare("--smoke", "--out", str(tmp_path / "x"), "--reuse", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--reuse" in bad.stderr


def test_claims_restricts_the_plan_to_those_claims_arms():
    plan = compare.Plan("default", ["--preset", "tiny"], 3, ["softmax"])
    assert [c.key for c in plan.claims] == ["softmax"]
    assert set(plan.seeds) == set(next(c for c in compare.claims("default") if c.key == "softmax").arms)
    assert len(plan.runs) == 2 * 3


def test_bad_flag_is_one_line():
    proc = run_compare("--seeds", "0", "--out", os.devnull + "-unused")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--seeds" in proc.stderr


# ----------------------------------------------------------------------------
# The plan: every strategy, and arms that differ only in what the paper varied.

def resolved(flags):
    args = train.parse_args(flags)
    return args, dataclasses.asdict(BALANCERS[args.balancer].settings(train.balance_config(args)))


def test_every_registered_strategy_is_an_arm_of_the_comparison():
    """Derived from the registry (the test-only toy_ema included), never listed."""
    plan = compare.Plan("smoke", ["--preset", "tiny"])
    assert set(BALANCERS) <= set(plan.seeds)


@pytest.mark.parametrize("key", ["lossfree", "alpha", "softmax"])
def test_wang_arms_share_one_gate(key):
    """Wang et al. 2024 (Table 2, Fig. 2, App. C) run both sides with the same
    gate: comparing a sigmoid lossfree with a softmax aux measures the gate."""
    claim = next(c for c in compare.claims("default") if c.key == key)
    gates = {resolved(flags)[1]["gate"] for flags in claim.arms.values()}
    assert len(gates) == 1, gates


def test_main_claim_pits_lossfree_against_aux_at_alpha_1e_3():
    claim = next(c for c in compare.claims("default") if c.key == "lossfree")
    settings = [resolved(flags)[1] for flags in claim.arms.values()]
    assert {s["alpha"] for s in settings} == {1e-3, None}


def test_qiu_arms_share_single_domain_data_and_differ_only_in_the_balance_group():
    """Qiu et al. 2025, Sec. 2.2: every micro-batch from one domain, for every arm."""
    claim = next(c for c in compare.claims("default") if c.key == "global")
    blocks = {resolved(flags)[0].domain_block for flags in claim.arms.values()}
    assert blocks == {compare.MICRO}


# ----------------------------------------------------------------------------
# The verdict rule, on constructed differences.

def test_a_clearly_positive_difference_holds_for_a_greater_than_claim():
    v = compare.verdict([0.50, 0.60, 0.55, 0.52], ">")
    assert v["verdict"] == "holds" and v["ci_low"] > 0 and v["seeds_to_resolve"] is None


def test_a_clearly_negative_difference_contradicts_a_greater_than_claim():
    v = compare.verdict([-0.50, -0.60, -0.55], ">")
    assert v["verdict"] == "contradicted" and v["ci_high"] < 0


def test_a_difference_inside_the_noise_is_unresolved_with_the_seeds_that_would_resolve_it():
    """The mean is on the claimed side, but its interval spans zero: not a
    verdict either way, and more seeds would tell."""
    v = compare.verdict([0.30, -0.10, 0.20, 0.05], ">")
    assert v["verdict"] == "unresolved" and v["diff"] > 0 and v["ci_low"] < 0 < v["ci_high"]
    assert v["seeds_to_resolve"] > 4
    w = compare.verdict([-0.30, 0.10, -0.20, -0.05], ">")   # the wrong side, inside the noise
    assert w["verdict"] == "unresolved"


def test_non_inferiority_is_judged_against_the_stated_margin():
    """"No worse" holds only if the interval's upper end stays below the margin."""
    m = compare.MARGIN
    assert compare.verdict([0.001, 0.002, 0.000, 0.001], "<", m)["verdict"] == "holds"
    assert compare.verdict([m + 0.001, m + 0.002, m + 0.0015], "<", m)["verdict"] == "contradicted"
    assert compare.verdict([m - 0.001, m + 0.001, m], "<", m)["verdict"] == "unresolved"
    # a mean below zero is not enough when the spread is wide
    assert compare.verdict([-0.05, 0.04, -0.03, 0.03], "<", m)["verdict"] == "unresolved"


def test_the_interval_is_the_student_t_interval_with_n_minus_1_degrees_of_freedom():
    """Pinned to scipy.stats.t.interval(0.95, 3, mean, sem) for these four
    values: a normal quantile (1.96) or n degrees of freedom would miss."""
    mean, sd, low, high = compare.interval([0.30, -0.10, 0.20, 0.05])
    assert mean == pytest.approx(0.1125) and sd == pytest.approx(0.175)
    assert (low, high) == (pytest.approx(-0.16597, abs=1e-4), pytest.approx(0.39097, abs=1e-4))


def test_seeds_needed_shrink_as_the_effect_grows():
    assert compare.seeds_needed(0.1, 0.1, 0) > compare.seeds_needed(0.3, 0.1, 0) >= 2
    assert compare.seeds_needed(0.0, 0.1, 0) is None


def test_an_effect_too_small_for_its_spread_gets_no_seed_count():
    """Mean 0.001 with sd 0.1 would take ~80,000 seeds: beyond MAX_SEEDS the
    rule says so instead of printing the number."""
    assert compare.seeds_needed(0.001, 0.1, 0) is None
    part = {**compare.verdict([0.1, -0.1, 0.101, -0.099], ">"), "unit": ""}
    assert part["verdict"] == "unresolved" and part["seeds_to_resolve"] is None
    assert f"more than {compare.MAX_SEEDS} seeds" in compare.resolve_note(part)


def test_the_seed_count_says_which_way_it_would_resolve():
    """The estimate takes the measured mean as the truth, so with the mean on
    the wrong side more seeds would settle it *against* the claim."""
    for diffs, way in (([0.30, -0.10, 0.20, 0.05], "as holds"), ([-0.30, 0.10, -0.20, -0.05], "as contradicted")):
        part = compare.verdict(diffs, ">")
        assert part["verdict"] == "unresolved" and way in compare.resolve_note(part)


def test_an_exact_check_that_fails_once_contradicts_the_claim():
    """The causality probe has no noise to wait out: one token-choice run with
    a non-zero probe is a bug, not an unresolved result."""
    r = compare.Results.__new__(compare.Results)
    assert r.exact("probe", [True, True, True])["verdict"] == "holds"
    assert r.exact("probe", [True, False, True])["verdict"] == "contradicted"
    assert r.exact("probe", [False, False])["verdict"] == "contradicted"


def test_a_claim_holds_only_if_every_part_holds():
    assert compare.combine(["holds", "holds"]) == "holds"
    assert compare.combine(["holds", "unresolved"]) == "unresolved"
    assert compare.combine(["unresolved", "contradicted"]) == "contradicted"
