"""compare.py: the whole comparison runs end to end at toy size, writes the
table and every plot, keeps finished runs, and its verdicts follow the numbers.

The end-to-end test trains every run of the plan for 3 steps with one seed
(`--smoke`), in a subprocess so that train.main's signal handlers and torch's
thread setting stay out of the test process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import compare  # noqa: E402

PLOTS = ["maxvio_batch.png", "expert_selection.png", "lossfree_bias.png", "alpha_tradeoff.png",
         "balance_batch.png", "expert_choice_leak.png"]


def run_compare(*flags):
    return subprocess.run([sys.executable, str(ROOT / "compare.py"), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = run_compare("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def table_rows(text, heading):
    """The first column of the markdown table under `heading`."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line.split("|")[1].strip())
        elif rows:
            break
    return rows[2:]                     # drop the header and the |---| line


def test_smoke_writes_results_and_every_plot(smoke):
    out, _ = smoke
    text = (out / "results.md").read_text()
    for png in PLOTS:
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in text, f"{png} is not linked from results.md"
    assert table_rows(text, "## Main comparison") == compare.STRATEGIES
    assert table_rows(text, "### Aux-loss coefficient alpha") == ["aux alpha=1e-2", "aux alpha=1e-3", "aux alpha=1e-4"]
    assert table_rows(text, "### Loss-free update rate") == ["lossfree u=1e-4", "lossfree u=1e-3", "lossfree u=1e-2"]
    assert len(table_rows(text, "### Balance batch")) == 4
    assert len(table_rows(text, "### Expert-choice routing chunk")) == 4
    claims = re.findall(r"^\d\. \*.*\*: \*\*(.*?)\*\*", text, flags=re.M)
    assert len(claims) == 5
    # One seed gives no noise estimate, so no claim may be judged.
    assert all(c.startswith("not measurable") for c in claims)


def test_smoke_columns_are_the_papers_measurements(smoke):
    out, _ = smoke
    header = (out / "results.md").read_text().split("## Main comparison", 1)[1].splitlines()[2]
    for column in ("val ppl", "ppl code", "ppl math", "ppl prose", "MaxVio_global", "MaxVio_batch",
                   "specialisation", "causal leak", "tokens/s"):
        assert column in header


def test_finished_runs_are_kept(smoke):
    out, first = smoke
    n_runs = len(re.findall(r"^\[\d+/\d+\]", first.stdout, flags=re.M))
    stamp = (out / "runs" / "none-s0" / "summary.json").stat().st_mtime_ns
    again = run_compare("--smoke", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished earlier, kept") == n_runs
    assert (out / "runs" / "none-s0" / "summary.json").stat().st_mtime_ns == stamp


def test_bad_flag_is_one_line():
    proc = run_compare("--seeds", "0", "--out", os.devnull + "-unused")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--seeds" in proc.stderr


# ----------------------------------------------------------------------------
# The verdict logic, on made-up numbers.

def fake_results(seeds, **points):
    """A Results whose runs have made-up metrics: points maps a plan label to
    {column: [value per seed]}; every other run gets zeros."""
    r = compare.Results.__new__(compare.Results)
    r.plan = compare.Plan(seeds, micro_seqs=8, large_chunk=32)
    columns = ["val_loss", "val_ppl", "maxvio_global", "maxvio_batch", "specialization", "causal_leak",
               "maxvio_early", "maxvio_late", "tokens_per_second"]
    r.rows = {name: dict.fromkeys(columns, 0.0) for name in r.plan.runs}
    for label, cols in points.items():
        for column, values in cols.items():
            for name, v in zip(r.plan.names(label), values):
                r.rows[name][column] = v
    return r


def lossfree_verdict(lossfree, aux, seeds=(0, 1, 2)):
    return compare.claim_lossfree(fake_results(list(seeds), lossfree=lossfree, aux=aux))[1]


AUX = dict(maxvio_global=[0.80, 0.75, 0.85], val_ppl=[9.0, 9.2, 8.9])


def test_claim_holds_when_every_part_is_clear():
    assert lossfree_verdict(dict(maxvio_global=[0.05, 0.04, 0.06], val_ppl=[8.9, 9.1, 8.8]), AUX) == "holds"


def test_claim_fails_when_a_part_goes_the_other_way():
    worse_ppl = dict(maxvio_global=[0.05, 0.04, 0.06], val_ppl=[9.5, 9.7, 9.4])
    assert lossfree_verdict(worse_ppl, AUX) == "does not hold"
    not_far = dict(maxvio_global=[0.60, 0.55, 0.65], val_ppl=[8.9, 9.1, 8.8])   # lower, but not half
    assert lossfree_verdict(not_far, AUX) == "does not hold"


def test_claim_within_noise_is_not_measurable():
    noisy = dict(maxvio_global=[0.05, 0.04, 1.0], val_ppl=[8.9, 9.1, 8.8])    # one seed spoils it
    assert lossfree_verdict(noisy, AUX) == "not measurable at this scale"


def test_paired_differences_cancel_the_seed_effect():
    """The seeds differ a lot, but lossfree beats aux by 0.1 on every seed: a
    paired comparison sees that clearly, a comparison of the means would not."""
    aux = dict(maxvio_global=[0.8, 0.8, 0.8], val_ppl=[8.0, 9.0, 10.0])
    lossfree = dict(maxvio_global=[0.1, 0.1, 0.1], val_ppl=[7.9, 8.9, 9.9])
    r = fake_results([0, 1, 2], lossfree=lossfree, aux=aux)
    assert compare.below(r.diff("lossfree", "aux", "val_ppl")) == "yes"
    assert compare.above(compare.Stat([0.1, -0.1, 0.05])) == "unclear"
    assert compare.above(compare.Stat([-0.1, -0.2, 0.05])) == "no"
    # "no worse": a worse mean hidden in the noise is not confirmation.
    assert compare.not_above(compare.Stat([-0.1, -0.2, 0.05])) == "yes"
    assert compare.not_above(compare.Stat([0.3, -0.2, 0.05])) == "unclear"
    assert compare.not_above(compare.Stat([0.3, 0.2, 0.25])) == "no"


def test_one_seed_is_never_judged():
    r = fake_results([0], lossfree=dict(maxvio_global=[0.05], val_ppl=[9.0]),
                     aux=dict(maxvio_global=[0.8], val_ppl=[9.0]))
    assert all(v.startswith("not measurable") for _, v, _ in compare.check_claims(r))
