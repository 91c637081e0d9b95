"""lab/compare.py, lab/claims.py and lab/stats.py: the whole comparison runs
end to end at toy size and writes results.json, results.md and every plot;
it keeps finished runs; each claim's arms differ only in what the paper
varied; a comparison of your own arms (--arms, your strategy from your file
included) is judged by the same rules; and the verdict rule follows the
numbers, three ways.

The end-to-end tests train every run of the plan for a few steps, in a
subprocess so that train.py's signal handlers and torch's thread setting
stay out of the test process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plumbing
import train
from balancers import BALANCERS
from lab import claims, compare, stats

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = set(stats.VERDICTS)


def run_compare(*flags, cwd=ROOT):
    """python -m lab.compare, as a user types it; from another folder the
    repository root comes from PYTHONPATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lab.compare", *flags], cwd=cwd, env=env,
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
    assert res["val_windows_per_domain"] == claims.SIZES["smoke"]["val_seqs"] and res["wall_time_s"] > 0
    assert len(res["plots"]) == len(compare.PLOTS)
    assert {c["key"] for c in res["claims"]} == {c.key for c in claims.paper_claims("smoke")}
    for png in res["plots"]:
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in text, f"{png} is not linked from results.md"
    for run in res["runs"]:
        assert run["flags"][-2:] == ["--seed", str(run["seed"])] and "val_loss" in run["summary"]
    judged = [c for c in res["claims"] if c["verdict"]]
    with_tests = {c.key for c in claims.paper_claims("smoke") if any(not isinstance(p, claims.Exact) for p in c.parts)}
    assert {c["key"] for c in judged} == with_tests                 # every claim with a statistical part gets a verdict
    assert all(p["metric"] == "causal_leak" for c in res["claims"] for p in c["properties"])   # exact: properties
    for claim in judged:
        assert claim["verdict"] in VERDICTS and claim["verdict_holm"] in VERDICTS and claim["parts"] and claim["scale"]
        for part in claim["parts"]:
            assert part["verdict"] in VERDICTS and part["verdict_holm"] in VERDICTS
            assert {"diff", "ci_low", "ci_high", "unit"} <= part.keys() and part["seeds"] == 1
            if "margin" in part:
                assert part["superiority"]["verdict"] in VERDICTS
    assert {"pilot", "val_windows_per_domain", "maxvio_batch_noise_floor", "margins_nats"} <= res.keys()
    ec = [run for run in res["runs"] if "expert_choice" in run["flags"]]
    assert ec and all("val_loss_causal" in run["summary"] for run in ec)
    assert all("maxvio_computation_batch" in run["summary"] for run in res["runs"])
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
    assert set(plan.seeds) == set(next(c for c in claims.paper_claims("default") if c.key == "softmax").arms)
    assert len(plan.runs) == 2 * 3


def test_bad_flag_is_one_line():
    proc = run_compare("--seeds", "0", "--out", os.devnull + "-unused")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--seeds" in proc.stderr


# ----------------------------------------------------------------------------
# Your own arms: a strategy from your file against a built-in one.

MEASURES = ("val loss lower", "MaxVio_global lower", "specialisation higher")


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """Two arms x 2 seeds on the tiny preset, 6 steps, two runs at a time in
    subprocesses, started from a folder that is not the repository root:
    train.py and the strategy file must be found from anywhere, and the
    relative --out lands in the folder the command ran from."""
    here = tmp_path_factory.mktemp("elsewhere")
    toy = ROOT / "tests" / "toy_strategy.py"
    proc = run_compare("--arms", f"toy=--import {toy} --balancer toy_ema", "lossfree=--balancer lossfree",
                       "--seeds", "2", "--preset", "tiny", "--train-args", "--steps 6", "--jobs", "2",
                       "--out", "cmp", cwd=here)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return here / "cmp", proc


def test_arms_print_a_paired_difference_with_interval_and_verdict_per_measure(arms):
    out, proc = arms
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("| lossfree - toy: ")]
    assert len(rows) == len(MEASURES), proc.stdout
    for measure, row in zip(MEASURES, rows):
        part, diff, ci, seeds, verdict, holm = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert part == f"lossfree - toy: {measure}"
        low, high = (float(x) for x in ci.strip("[]").split(","))
        assert low <= float(diff.split()[0]) <= high and seeds == "2"
        assert verdict.split()[0] in VERDICTS and holm in VERDICTS
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "arms" and [c["key"] for c in res["claims"]] == ["arms"] and res["plots"] == []
    parts = res["claims"][0]["parts"]
    assert [(p["a"], p["b"]) for p in parts] == [("lossfree", "toy")] * 3
    assert [p["metric"] for p in parts] == ["val_loss", "maxvio_global", "specialization"]


def test_every_arm_trains_on_the_same_seeds_with_its_own_flags(arms):
    out, _ = arms
    res = json.loads((out / "results.json").read_text())
    assert {lbl: arm["seeds"] for lbl, arm in res["arms"].items()} == {"toy": [0, 1], "lossfree": [0, 1]}
    strategies = {(run["labels"][0], run["seed"]): run["summary"]["strategy"] for run in res["runs"]}
    assert set(strategies) == {(lbl, s) for lbl in ("toy", "lossfree") for s in (0, 1)}
    assert all("ema_decay" in strategies["toy", s] and "bias_rate" in strategies["lossfree", s] for s in (0, 1))
    assert all(run["summary"]["steps"] == 6 for run in res["runs"])


def test_publish_refuses_a_comparison_of_your_own_arms(arms, tmp_path, monkeypatch):
    """--publish writes the papers' results into the project: never yours."""
    out, _ = arms
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    with pytest.raises(ValueError, match="--arms"):
        compare.publish(out)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_arm_is_one_line_naming_the_arm(tmp_path):
    proc = run_compare("--arms", "mine=--balancer aux --no-such-flag", "lossfree", "--preset", "tiny",
                       "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "--arms mine" in proc.stderr, proc.stderr


def test_arms_pair_every_arm_with_the_first_and_compare_causal_losses_with_expert_choice():
    """Teacher forcing lets expert choice read the future of its routing
    group: a pair with it compares the loss generation sees."""
    arms = {"a": ["--balancer", "aux"], "b": ["--balancer", "lossfree"], "c": ["--balancer", "expert_choice"]}
    claim = claims.strategy_comparison(arms, {"a": True, "b": True, "c": False})
    assert [(p.a, p.b) for p in claim.parts] == [("b", "a")] * 3 + [("c", "a")] * 3
    assert [p.metric for p in claim.parts[::3]] == ["val_loss", "val_loss_as_generated"]
    assert [p.side for p in claim.parts[:3]] == ["<", "<", ">"]


def test_arm_flags_without_a_label_name_a_strategy_and_the_runner_keeps_its_own_flags():
    args = compare.parse_args(["--arms", "aux", "mine=--balancer lossfree --bias-rate 1e-2"])
    assert args.arms == {"aux": ["--balancer", "aux"], "mine": ["--balancer", "lossfree", "--bias-rate", "1e-2"]}
    for flags in ("--seed 3", "--out x"):
        with pytest.raises(SystemExit):
            compare.parse_args(["--arms", "aux", f"mine=--balancer lossfree {flags}"])


# ----------------------------------------------------------------------------
# The plan: every strategy, and arms that differ only in what the paper varied.

def resolved(flags):
    args = train.parse_args(flags)
    return args, plumbing.strategy_settings(args)


def test_every_registered_strategy_is_an_arm_of_the_comparison():
    """Derived from the registry (the test-only toy_ema included), never listed."""
    plan = compare.Plan("smoke", ["--preset", "tiny"])
    assert set(BALANCERS) <= set(plan.seeds)


@pytest.mark.parametrize("key", ["lossfree", "alpha", "softmax"])
def test_wang_arms_share_one_gate(key):
    """Wang et al. 2024 (Table 2, Fig. 2, App. C) run both sides with the same
    gate: comparing a sigmoid lossfree with a softmax aux measures the gate."""
    claim = next(c for c in claims.paper_claims("default") if c.key == key)
    gates = {resolved(flags)[1]["gate"] for flags in claim.arms.values()}
    assert len(gates) == 1, gates


def test_main_claim_pits_lossfree_against_aux_at_alpha_1e_3():
    claim = next(c for c in claims.paper_claims("default") if c.key == "lossfree")
    settings = [resolved(flags)[1] for flags in claim.arms.values()]
    assert {s.get("alpha") for s in settings} == {1e-3, None}      # lossfree has no alpha knob


def test_qiu_arms_share_single_domain_data_and_differ_only_in_the_balance_group():
    """Qiu et al. 2025, Sec. 2.2 and 4.1, in their shape: every micro-batch
    from one domain, shared experts beside the routed ones, the softmax gate,
    LBL weight 0.008 and z-loss 1e-3 in every arm; a micro balance group
    large enough that f is not counting noise (at least 32 assignments per
    expert), the global batch at least 8x it; one shuffle arm."""
    claim = next(c for c in claims.paper_claims("default") if c.key == "global")
    size = claims.SIZES["default"]
    arms = [resolved(size["model"] + ["--batch-size", str(size["batch"])] + flags) for flags in claim.arms.values()]
    assert {args.domain_block for args, _ in arms} == {claims.QIU_MICRO}
    assert all(args.shared_experts > 0 for args, _ in arms)
    assert all((s["gate"], s["alpha"], s["z_loss"]) == ("softmax", 0.008, 1e-3) for _, s in arms)
    micro_args, micro = arms[0]
    tokens = micro["balance_seqs"] * micro_args.seq_len
    assert micro["balance_seqs"] == claims.QIU_MICRO and tokens * micro_args.top_k / micro_args.n_experts >= 32
    assert micro_args.batch_size >= 8 * micro["balance_seqs"]
    assert [s["balance_shuffle"] for _, s in arms if "balance_shuffle" in s].count(True) == 1


def test_every_expert_choice_arm_has_several_routing_groups_per_batch():
    """With one group per batch the shuffle control would be an identity."""
    claim = next(c for c in claims.paper_claims("default") if c.key == "expert_choice")
    batch = claims.SIZES["default"]["batch"]
    assert all(batch // resolved(flags)[1]["route_seqs"] >= 4 for flags in claim.arms.values())


def test_non_inferiority_margins_are_no_larger_than_the_papers_own_effects():
    """Wang et al. Table 2: ln(9.56 / 9.50); Table 6: ln(9.604 / 9.599); Qiu
    et al. Table 2 (120B, 128x): shuffle vs global ln(8.041 / 8.038)."""
    papers = {"lossfree": math.log(9.56 / 9.50), "softmax": math.log(9.604 / 9.599),
              "global": math.log(8.041 / 8.038)}
    assert claims.MARGINS.keys() == papers.keys()
    assert all(0 < claims.MARGINS[k][0] <= papers[k] for k in papers)


def test_claim_one_and_the_alpha_sweep_use_the_deepseekmoe_shape():
    """Shared plus fine-grained routed experts, as both papers trained."""
    for key in ("lossfree", "alpha", "computation_batch"):
        claim = next(c for c in claims.paper_claims("default") if c.key == key)
        for flags in claim.arms.values():
            args = resolved(["--preset", "tiny"] + flags)[0]
            assert (args.shared_experts, args.n_experts, args.top_k) == (2, 32, 4)


# ----------------------------------------------------------------------------
# The verdict rule, on constructed differences.

def test_a_clearly_positive_difference_holds_for_a_greater_than_claim():
    v = stats.verdict([0.50, 0.60, 0.55, 0.52], ">")
    assert v["verdict"] == "holds" and v["ci_low"] > 0 and v["seeds_to_resolve"] is None


def test_a_clearly_negative_difference_contradicts_a_greater_than_claim():
    v = stats.verdict([-0.50, -0.60, -0.55], ">")
    assert v["verdict"] == "contradicted" and v["ci_high"] < 0


def test_a_difference_inside_the_noise_is_unresolved_with_the_seeds_that_would_resolve_it():
    """The mean is on the claimed side, but its interval spans zero: not a
    verdict either way, and more seeds would tell."""
    v = stats.verdict([0.30, -0.10, 0.20, 0.05], ">")
    assert v["verdict"] == "unresolved" and v["diff"] > 0 and v["ci_low"] < 0 < v["ci_high"]
    assert v["seeds_to_resolve"] > 4
    w = stats.verdict([-0.30, 0.10, -0.20, -0.05], ">")   # the wrong side, inside the noise
    assert w["verdict"] == "unresolved"


def test_non_inferiority_is_judged_against_the_stated_margin():
    """"No worse" holds only if the interval's upper end stays below the margin."""
    m = claims.MARGINS["lossfree"][0]
    assert stats.verdict([0.001, 0.002, 0.000, 0.001], "<", m)["verdict"] == "holds"
    assert stats.verdict([m + 0.001, m + 0.002, m + 0.0015], "<", m)["verdict"] == "contradicted"
    assert stats.verdict([m - 0.001, m + 0.001, m], "<", m)["verdict"] == "unresolved"
    # a mean below zero is not enough when the spread is wide
    assert stats.verdict([-0.05, 0.04, -0.03, 0.03], "<", m)["verdict"] == "unresolved"


def test_the_interval_is_the_student_t_interval_with_n_minus_1_degrees_of_freedom():
    """Pinned to scipy.stats.t.interval(0.95, 3, mean, sem) for these four
    values: a normal quantile (1.96) or n degrees of freedom would miss."""
    mean, sd, low, high = stats.interval([0.30, -0.10, 0.20, 0.05])
    assert mean == pytest.approx(0.1125) and sd == pytest.approx(0.175)
    assert (low, high) == (pytest.approx(-0.16597, abs=1e-4), pytest.approx(0.39097, abs=1e-4))


def test_seeds_needed_shrink_as_the_effect_grows():
    assert stats.seeds_needed(0.1, 0.1, 0) > stats.seeds_needed(0.3, 0.1, 0) >= 2
    assert stats.seeds_needed(0.0, 0.1, 0) is None


def test_an_effect_too_small_for_its_spread_gets_no_seed_count():
    """Mean 0.001 with sd 0.1 would take ~80,000 seeds: beyond MAX_SEEDS the
    rule says so instead of printing the number."""
    assert stats.seeds_needed(0.001, 0.1, 0) is None
    part = {**stats.verdict([0.1, -0.1, 0.101, -0.099], ">"), "unit": ""}
    assert part["verdict"] == "unresolved" and part["seeds_to_resolve"] is None
    assert f"more than {stats.MAX_SEEDS} seeds" in stats.resolve_note(part)


def test_the_sd_upper_bound_is_the_chi_square_bound():
    """Five seeds can understate a spread several-fold: the seed count uses
    sd sqrt((n-1) / chi2_0.05(n-1)), pinned to scipy.stats.chi2 (2.372 at n = 5),
    and the Wilson-Hilferty form beyond the table agrees with it closely."""
    assert stats.sd_upper(1.0, 5) == pytest.approx(2.3724, abs=1e-3)
    assert stats.sd_upper(1.0, 41) == pytest.approx(math.sqrt(40 / 26.5093), abs=1e-3)
    assert stats.sd_upper(1.0, 3) > stats.sd_upper(1.0, 5) > stats.sd_upper(1.0, 30) > 1


def test_seeds_are_powered_at_the_papers_effect_or_the_margin_not_at_the_pilots_mean():
    """A pilot mean of 3x the paper's effect would promise few seeds; the
    count is powered at the paper's number when the part has one, at effect 0
    against the margin for a "no worse" part, and at the pilot's own mean
    only where the paper gives no figure."""
    diffs = [-0.30, -0.25, -0.35, -0.28, -0.32]
    part = stats.verdict(diffs, "<")
    at_mean = stats.powered_seeds(part)
    at_paper = stats.powered_seeds({**part, "effect": -0.1})
    assert at_paper > at_mean
    assert at_paper == stats.seeds_needed(-0.1, stats.sd_upper(part["sd"], 5), 0)
    no_worse = stats.paired([0.051, 0.048, 0.05, 0.051, 0.049], [0.05] * 5, "<", 0.05)
    assert stats.powered_seeds(no_worse) == stats.seeds_needed(0.0, stats.sd_upper(no_worse["sd"], 5), 0.05)
    level = stats.verdict([2.3, 2.5, 2.2, 2.4, 2.6], ">", 1.0)          # a level, not a margin: at its own mean
    assert stats.powered_seeds(level) == stats.seeds_needed(level["diff"], stats.sd_upper(level["sd"], 5), 1.0)


def test_a_part_is_judged_on_every_seed_its_arms_share_not_its_claims_subset():
    """Arms shared by two claims have the union of their seeds, and every
    part reads all of them: a claim with 3 seeds whose arms another claim
    runs on 10 is judged on 10."""
    plan = compare.Plan("default", ["--preset", "tiny"], keys=["computation_batch", "alpha"],
                        seed_lists={"computation_batch": range(3), "alpha": range(10)})
    cb = next(c for c in plan.claims if c.key == "computation_batch")
    assert plan.claim_seeds["computation_batch"] == [0, 1, 2]
    assert all(compare.part_seeds(plan, p) == list(range(10)) for p in cb.parts)


def test_the_seed_count_says_which_way_it_would_resolve():
    """The estimate takes the measured mean as the truth, so with the mean on
    the wrong side more seeds would settle it *against* the claim."""
    for diffs, way in (([0.30, -0.10, 0.20, 0.05], "as holds"), ([-0.30, 0.10, -0.20, -0.05], "as contradicted")):
        part = stats.verdict(diffs, ">")
        assert part["verdict"] == "unresolved" and way in stats.resolve_note(part)
        assert "if the measured mean and spread were the truth" in stats.resolve_note(part)


def test_an_exact_check_that_fails_once_contradicts_the_claim():
    """The causality probe has no noise to wait out: one token-choice run with
    a non-zero probe is a bug, not an unresolved result."""
    probe = claims.Exact("probe", ["ec"], "causal_leak", claims.leaks)
    judge = lambda leaks: probe.judge(lambda label, metric, seeds: leaks, [0, 1, 2], lambda label: False)
    assert judge([1e-3, 2e-3, 5e-4])["verdict"] == "holds"
    assert judge([1e-3, 0.0, 5e-4])["verdict"] == "contradicted"
    assert judge([0.0, 0.0])["verdict"] == "contradicted"


def test_a_claim_holds_only_if_every_part_holds():
    assert stats.combine(["holds", "holds"]) == "holds"
    assert stats.combine(["holds", "unresolved"]) == "unresolved"
    assert stats.combine(["unresolved", "contradicted"]) == "contradicted"


def test_the_two_sided_p_value_is_student_t_with_n_minus_1_degrees_of_freedom():
    """Pinned to 2 * scipy.stats.t.sf(t, df) for odd and even df."""
    for t, df, p in ((2.5, 1, 0.242238), (2.5, 2, 0.129612), (1.3, 3, 0.284468), (3.1, 9, 0.012722)):
        assert stats.t_two_sided_p(t, df) == pytest.approx(p, abs=1e-6)
    # p < 0.05 exactly when the 95% interval excludes the target
    for diffs in ([0.30, -0.10, 0.20, 0.05], [0.50, 0.60, 0.55, 0.52]):
        v = stats.verdict(diffs, ">")
        assert (v["p"] < 0.05) == (v["verdict"] != "unresolved")


def test_holm_adjusts_constructed_p_values_step_down():
    """m = 4 sorted 0.01, 0.02, 0.03, 0.04: adjusted 4 x 0.01 = 0.04,
    max(0.04, 3 x 0.02) = 0.06, then 0.06, 0.06. Only the first survives at
    5%, although all four are below 0.05 unadjusted."""
    adjusted, rejected = stats.holm([0.03, 0.01, 0.04, 0.02])
    assert adjusted == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert rejected == [False, True, False, False]
    assert stats.holm([0.001, 0.9])[1] == [True, False]


def test_holm_verdicts_cover_every_part_and_weaken_only():
    """A part's Holm verdict is its own or 'unresolved', never the other
    side; exact parts keep theirs."""
    judged = [{"parts": [{**stats.verdict([0.50, 0.60, 0.55, 0.52], ">"), "part": "a"},
                         {**stats.verdict([0.10, 0.04, 0.14, 0.05], ">"), "part": "b"},     # p = 0.038
                         {**stats.verdict([0.30, -0.10, 0.20, 0.05], ">"), "part": "c"}]},
              {"parts": [{"part": "probe", "verdict": "holds", "seeds": 2}]}]
    assert stats.apply_holm(judged) == 3
    a, b, c = judged[0]["parts"]
    assert a["verdict"] == a["verdict_holm"] == "holds"
    assert b["verdict"] == "holds" and b["p_holm"] == pytest.approx(2 * b["p"]) and b["verdict_holm"] == "unresolved"
    assert c["verdict"] == c["verdict_holm"] == "unresolved" and judged[0]["verdict_holm"] == "unresolved"
    assert judged[1]["parts"][0]["verdict_holm"] == "holds" and judged[1]["verdict_holm"] == "holds"


def test_the_pilot_fixes_each_claims_seeds_within_its_budget():
    """A part that needs many seeds takes the claim's budget share; a clear
    one needs few, but never fewer than MIN_SEEDS."""
    plan = compare.Plan("default", ["--preset", "tiny"], keys=["lossfree", "softmax"],
                        seed_lists={"lossfree": stats.PILOT_SEEDS, "softmax": stats.PILOT_SEEDS})
    judged = [{"key": "lossfree", "parts": [{**stats.verdict([0.001, -0.002, 0.003], "<"), "part": "x"}]},
              {"key": "softmax", "parts": [{**stats.verdict([-0.50, -0.60, -0.55], "<"), "part": "y"}]}]
    summary = compare.pilot_summary(judged, plan, Path("/nonexistent"))
    budget = {c.key: c.seeds for c in claims.paper_claims("default")}
    assert summary["seeds"] == {"lossfree": budget["lossfree"], "softmax": stats.MIN_SEEDS}
    assert summary["seeds_used"] == stats.PILOT_SEEDS and min(stats.PILOT_SEEDS) >= 1000
    assert {"diff", "sd", "seeds_needed"} <= summary["parts"]["lossfree: x"].keys()


def test_a_confirmatory_run_is_never_extended_in_its_folder(tmp_path):
    """The seeds are fixed in OUT/seeds.json by the first run; asking the
    same folder for more seeds later is refused with one line."""
    args = compare.parse_args(["--out", str(tmp_path), "--seeds", "2", "--claims", "softmax"])
    plan = compare.confirmatory_plan(args, ["--preset", "tiny"], tmp_path, None)
    assert plan.claim_seeds == {"softmax": [0, 1]}
    assert compare.confirmatory_plan(args, ["--preset", "tiny"], tmp_path, None).claim_seeds == plan.claim_seeds
    more = compare.parse_args(["--out", str(tmp_path), "--seeds", "3", "--claims", "softmax"])
    with pytest.raises(ValueError, match="never extended"):
        compare.confirmatory_plan(more, ["--preset", "tiny"], tmp_path, None)
    pilot = {"seeds": {"softmax": 4}}
    fresh = compare.parse_args(["--out", str(tmp_path / "new"), "--claims", "softmax"])
    assert compare.confirmatory_plan(fresh, ["--preset", "tiny"], tmp_path / "new", pilot).claim_seeds == \
        {"softmax": [0, 1, 2, 3]}


def test_the_default_plan_is_estimated_to_fit_in_90_minutes():
    """The budget shares are sized so that the confirmatory run fits on a
    2-core machine, two runs at a time, at the measured per-step times."""
    size = claims.SIZES["default"]
    common = size["model"] + ["--batch-size", str(size["batch"]), "--steps", str(size["steps"])]
    assert compare.Plan("default", common).estimate_minutes(2) <= 90


def test_a_plan_over_the_time_budget_gives_up_seeds_before_it_runs(tmp_path):
    """With run times (say, from a slow pilot) that put the plan over 90
    minutes, seeds are taken from the largest claims, never below MIN_SEEDS."""
    args = compare.parse_args(["--out", str(tmp_path), "--claims", "softmax,bias_rate", "--jobs", "2"])
    slow = {stem: 600.0 for stem in compare.Plan("default", ["--preset", "tiny"], 1).stem.values()}
    wanted = compare.fit_budget(args, ["--preset", "tiny"], {"softmax": 10, "bias_rate": 6}, {"softmax", "bias_rate"},
                                slow)
    assert stats.MIN_SEEDS <= min(wanted.values()) and wanted["softmax"] < 10
    plan = compare.Plan("default", ["--preset", "tiny"], keys=["softmax", "bias_rate"],
                        seed_lists={k: range(n) for k, n in wanted.items()})
    assert plan.estimate_minutes(2, slow) <= compare.BUDGET_MINUTES or set(wanted.values()) == {stats.MIN_SEEDS}


def test_publish_writes_results_docs_page_and_the_readme_verdict_table_only_between_markers(smoke, tmp_path,
                                                                                             monkeypatch):
    """--publish on a copy of the project: results/ gets results.json and
    every plot, docs/results.md the whole page, and the README changes only
    between its markers, where every judged claim gets one verdict row."""
    out, _ = smoke
    readme = (compare.ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme)
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    compare.publish(out)
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    assert all((tmp_path / "results" / p).is_file() for p in res["plots"])
    page = (tmp_path / "docs" / "results.md").read_text()
    assert all(f"](../results/{p})" in page for p in res["plots"])
    new = (tmp_path / "README.md").read_text()
    before, after = readme.split(compare.README_BEGIN)[0], readme.split(compare.README_END)[1]
    assert new.startswith(before) and new.endswith(after)
    table = new.split(compare.README_BEGIN)[1].split(compare.README_END)[0]
    parts = [p for c in res["claims"] if c["verdict"] for p in c["parts"]]
    properties = [p for c in res["claims"] for p in c["properties"]]
    assert parts and all(f"| {p['part']} |" in table and f"| {p['verdict_holm']} |" in table for p in parts)
    assert properties and all(f"| {p['part']} | exact, every run |" in table for p in properties)
    assert table.count("\n|") == len(parts) + len(properties) + 2     # header, rule, a row per part and property


def test_byte_controlled_specialisation_is_0_for_routing_by_byte_and_positive_for_routing_by_domain():
    """The domains use different bytes, so plain specialisation rewards an
    expert for taking digits. Held to the byte, routing that follows the
    byte alone scores (about) 0 against the shuffled-label null, and routing
    that follows the domain scores well above it."""
    g = torch.Generator().manual_seed(0)
    n, E = 30000, 8
    domain = torch.randint(0, 3, (n,), generator=g)
    byte = torch.where(domain == 1, torch.randint(48, 58, (n,), generator=g), torch.randint(97, 123, (n,), generator=g))
    byte[::7] = 32                                                    # a byte every domain uses
    tok = torch.arange(n)
    by_byte = [(tok, byte % E)]
    by_domain = [(tok, (domain * 2 + torch.randint(0, 2, (n,), generator=g)) % E)]
    assert abs(compare.within_byte_specialization(byte, domain, by_byte, E)) < 0.01
    assert compare.within_byte_specialization(byte, domain, by_domain, E) > 0.3


def test_the_sigmoid_aux_gradient_never_raises_a_score_and_the_softmax_one_does():
    """lab.aux_diagnosis's reading of Wang et al. Eq. 2 with raw sigmoid P:
    d(aux)/d(u_ti) = alpha N f_i s(1 - s) / T is never negative, so the loss
    can only lower scores (every one of them at once); under softmax the
    idle experts' logits get a negative gradient, which raises them."""
    from lab import aux_diagnosis
    from moe import GPT, GPTConfig
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    share = {}
    for gate in ("sigmoid", "softmax"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(seq_len=16, n_layers=1, d_model=16, n_heads=2, n_experts=8, top_k=2, d_expert=8,
                              balancer="aux", balance=dict(alpha=1e-2, balance_seqs=2, gate=gate)))
        share[gate] = aux_diagnosis.measure(model, x)["negative_share"]
    assert share["sigmoid"] == 0.0 and share["softmax"] > 0.3
