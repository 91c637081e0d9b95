"""
lab/stats.py -- the statistics of every comparison: a paired difference per
seed, its 95% t-interval, the three-way verdict, the seeds that would settle
an unresolved one, and Holm-Bonferroni over a family of tests.

The rules, for d = a - b taken *within* a seed (two runs with the same seed
share initialisation and batches, so most run-to-run noise cancels):
  - holds if the 95% interval of the mean d lies wholly on the claimed side
    of the target (0, or a non-inferiority margin), contradicted if wholly
    on the other side, unresolved otherwise. A mean inside its own interval
    never decides anything;
  - an unresolved difference is reported with the seeds that would settle
    it at 80% power *if* the measured mean and spread were the truth, and
    which way it would then go: a conditional guide, labelled as one;
  - seeds are fixed before looking: a pilot on PILOT_SEEDS (five, >= 1000)
    measures the spread, and the confirmatory run uses fresh seeds 0..n-1
    with n powered at the paper's effect (0 for a "no worse" claim, whose
    target is its margin), using the upper 95% confidence bound of the
    pilot's spread, since five seeds can understate it several-fold; never
    fewer than MIN_SEEDS;
  - Holm-Bonferroni over every test of a family holds the family-wise error
    at 5%: a verdict survives only if its test does.

Plain Python: no torch, so that every number here can be checked by hand.
"""

import math

# Student t quantiles by degrees of freedom: two-sided 95% (for the interval)
# and one-sided 80% (for the power estimate). Beyond 30: the normal's.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
       0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855,
       0.854, 0.854]

# Chi-square 5% quantiles by degrees of freedom 1..30 (scipy.stats.chi2.ppf(0.05, df)),
# for the upper confidence bound of a standard deviation; beyond 30, Wilson-Hilferty.
CHI2_05 = [0.0039, 0.1026, 0.3518, 0.7107, 1.1455, 1.6354, 2.1673, 2.7326, 3.3251, 3.9403, 4.5748, 5.2260,
           5.8919, 6.5706, 7.2609, 7.9616, 8.6718, 9.3905, 10.1170, 10.8508, 11.5913, 12.3380, 13.0905, 13.8484,
           14.6114, 15.3792, 16.1514, 16.9279, 17.7084, 18.4927]

VERDICTS = ("holds", "contradicted", "unresolved")

# Seeds. A pilot on PILOT_SEEDS measures each part's paired spread; the
# confirmatory run then uses seeds 0..n-1 with n fixed from the pilot, never
# fewer than MIN_SEEDS, and is never extended once results have been seen.
PILOT_SEEDS = list(range(1000, 1005))
MIN_SEEDS = 5
MAX_SEEDS = 1000   # beyond this, "more seeds" is no longer a plan


def t_quantile(table, df, normal):
    return table[df - 1] if df <= len(table) else normal


def interval(values):
    """Mean, sample std and 95% t-interval of the mean; no interval for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(T975, n - 1, 1.960) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def sd_upper(sd, n):
    """The upper 95% confidence bound of a standard deviation measured on n
    values: sd sqrt((n - 1) / chi2_0.05(n - 1)). At n = 5 it is 2.37 sd."""
    df = n - 1
    q = CHI2_05[df - 1] if df <= len(CHI2_05) else df * (1 - 2 / (9 * df) - 1.645 * math.sqrt(2 / (9 * df))) ** 3
    return sd * math.sqrt(df / q)


def seeds_needed(mean, sd, target):
    """Seeds at which a difference of this mean and spread would leave `target`
    outside its 95% interval 80% of the time, *if* the mean and spread given
    were the truth. It would settle the claim on the side the mean lies on,
    which may be the side against it. None if the mean sits on the target or
    more than MAX_SEEDS would be needed."""
    gap = abs(mean - target)
    if sd is None or gap == 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if (t_quantile(T975, n - 1, 1.960) + t_quantile(T80, n - 1, 0.842)) * sd / math.sqrt(n) < gap:
            return n
    return None


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with integer df, in closed form
    (Abramowitz & Stegun 26.7.3-4: a finite series in theta = atan(t/sqrt(df)))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term = total = math.cos(theta)
        for j in range(1, (df - 3) // 2 + 1):
            term *= 2 * j / (2 * j + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + (s * total if df > 1 else 0.0))
    else:
        term = total = 1.0
        for j in range(1, (df - 2) // 2 + 1):
            term *= (2 * j - 1) / (2 * j) * c2
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def p_value(diffs, target):
    """Two-sided p of the t-test that the mean difference equals `target`
    (0, or the margin): p < 0.05 exactly when the 95% interval excludes it."""
    mean, sd, _, _ = interval(diffs)
    if sd is None:
        return None
    if sd == 0:
        return 0.0 if mean != target else 1.0
    return t_two_sided_p((mean - target) / (sd / math.sqrt(len(diffs))), len(diffs) - 1)


def verdict(diffs, side, margin=0.0):
    """The rule, for d = a - b per seed and the claim "d < margin" (side "<")
    or "d > margin" (side ">"): holds if the 95% interval lies wholly on the
    claimed side of the margin, contradicted if wholly on the other side,
    unresolved otherwise. For "a is no worse than b" the margin is the
    non-inferiority margin, stated with the result."""
    mean, sd, low, high = interval(diffs)
    if low is None:
        v = "unresolved"
    elif (high < margin) if side == "<" else (low > margin):
        v = "holds"
    elif (low > margin) if side == "<" else (high < margin):
        v = "contradicted"
    else:
        v = "unresolved"
    return {"diff": mean, "sd": sd, "ci_low": low, "ci_high": high, "seeds": len(diffs), "verdict": v,
            "claim": f"{side} {margin:g}", "p": p_value(diffs, margin),
            "seeds_to_resolve": seeds_needed(mean, sd, margin) if v == "unresolved" else None}


def paired(a, b, side, margin=0.0):
    """The verdict on d = a - b, seed by seed (a[i] and b[i] share a seed).
    With a margin ("a is no worse than b"), also the superiority test: the
    same differences against 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs the same seeds on both sides (got {len(a)} and {len(b)} runs)")
    d = [x - y for x, y in zip(a, b)]
    out = verdict(d, side, margin)
    if margin:
        out.update(margin=margin, superiority=verdict(d, side, 0.0))
    return out


def holm(p_values, level=0.05):
    """Holm-Bonferroni: which of m hypotheses are rejected with the
    family-wise error held at `level`. Sorted p_(1) <= ... <= p_(m); reject
    p_(i) while p_(i) <= level / (m - i + 1), and stop at the first that
    is not. Returns the adjusted p-values (in the input order) and which are
    rejected: those whose adjusted p is at most `level`."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted, [a <= level for a in adjusted]


def combine(verdicts):
    """A claim holds if every part holds, is contradicted if any part is."""
    if "contradicted" in verdicts:
        return "contradicted"
    return "holds" if all(v == "holds" for v in verdicts) else "unresolved"


def apply_holm(judged):
    """verdict_holm for every statistical test of every part of every claim
    in `judged` (each part's own test, and the superiority test of a "no
    worse" part), as one family: a part holds or is contradicted only if its
    test survives Holm's adjustment; the side is the one its interval lies
    on. Exact parts have no noise and keep their verdict. Returns the
    number of tests in the family."""
    tests = [t for c in judged for p in c["parts"] for t in (p, p.get("superiority")) if t and t.get("p") is not None]
    adjusted, rejected = holm([t["p"] for t in tests])
    for t, p_adj, rej in zip(tests, adjusted, rejected):
        t["p_holm"], t["verdict_holm"] = p_adj, t["verdict"] if rej else "unresolved"
    for c in judged:
        for p in c["parts"]:
            for t in (p, p.get("superiority")):
                if t is not None:
                    t.setdefault("verdict_holm", "unresolved" if "diff" in t else t["verdict"])
        c["verdict_holm"] = combine([p["verdict_holm"] for p in c["parts"]]) if c["parts"] else None
    return len(tests)


def powered_seeds(part):
    """The seeds one pilot part asks of the confirmatory run: 80% power at
    the effect the paper reports for it (part["effect"], in the part's own
    units; a "no worse" part's effect is 0, so its target is the margin),
    or at the pilot's own mean where the paper gives no number
    (part["powered_at"] says which), with the pilot spread's upper 95%
    bound (sd_upper). None if more than MAX_SEEDS would be needed."""
    target = float(part["claim"].split()[1])
    effect = part.get("effect")
    if effect is None and "superiority" in part:       # a "no worse" part: the margin is its target
        effect = 0.0
    mean = part["diff"] if effect is None else effect
    return seeds_needed(mean, sd_upper(part["sd"], part["seeds"]), target) if part.get("sd") else None


def confirmatory_seeds(parts, budget):
    """The seeds a confirmatory run gives a claim, from its pilot parts: the
    most any part needs (powered_seeds; a part that would need more than
    MAX_SEEDS counts as the budget), at least MIN_SEEDS (unless the budget
    is smaller: a claim of exact checks alone) and at most `budget`. Parts
    without a difference (exact checks) need no seeds."""
    need = []
    for p in parts:
        if "diff" not in p:
            continue
        n = powered_seeds(p)
        need.append(n if n is not None else budget)
    return max(min(MIN_SEEDS, budget), min(budget, max(need, default=MIN_SEEDS)))


def resolve_note(part):
    """What more seeds would do for an unresolved part, and which way."""
    if "diff" not in part or part.get("sd") is None:
        return ""
    n = part.get("seeds_to_resolve")
    if not n:
        return f" (more than {MAX_SEEDS} seeds: too small an effect for its spread)"
    side, margin = part["claim"].split()
    on_claimed_side = part["diff"] < float(margin) if side == "<" else part["diff"] > float(margin)
    at = " at the paper's margin" if float(margin) else ""
    return (f" (unresolved{at}: if the measured mean and spread were the truth, ~{n} seeds would resolve it, as "
            f"{'holds' if on_claimed_side else 'contradicted'})")
