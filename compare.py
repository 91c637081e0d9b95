"""
compare.py -- train every load-balancing strategy on the same data, model and
seeds, and check the papers' claims against the numbers.

    python compare.py              # about 20 min on 2 CPU cores: 4 seeds, all sweeps
    python compare.py --quick      # a few minutes: 2 seeds, short runs
    torchrun --nproc_per_node=2 compare.py --quick    # the same, expert parallel

It teaches how to compare training recipes honestly:
  - one model, one schedule and the same seeds for every strategy, so two
    runs with the same seed see the same initialisation and the same batches;
  - several seeds, and differences taken *within* a seed (paired), so that a
    difference can be weighed against seed-to-seed noise;
  - a verdict for each paper claim computed from the numbers, so a claim
    that fails at this scale is reported as failing, not tuned until it passes.

Read it top to bottom:
  1. the plan: the main comparison and the sweeps that mirror the papers'
     figures; each point of the plan is a set of train.py flags
  2. running the plan through train.main, resumably (finished runs are kept)
  3. reading summary.json / log.jsonl, statistics over seeds
  4. the claims: a few lines of verdict logic each
  5. the plots, one function per paper figure
  6. results.md and main

Output (--out, default compare_out/): results.md, the PNG plots, and each
run's log.jsonl, summary.json and train.txt under runs/.
"""

import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from contextlib import redirect_stdout

import torch
import torch.distributed as dist

import train

# ----------------------------------------------------------------------------
# 1. The plan.

# How big each run is. The papers' effects need a few hundred steps to show,
# so the default spends its budget on steps and seeds rather than on width:
# train.py's tiny model (2 layers, d_model 64) with 16 experts top-2, batches
# of 32 x 64 bytes. `quick` cuts steps and seeds; `smoke` only checks that
# everything runs (the tests use it).
SIZES = {
    "default": dict(seeds=4, steps=400, batch=32, warmup=20, log_every=5, val_seqs=32,
                    model=["--preset", "tiny", "--n-experts", "16"]),
    "quick": dict(seeds=2, steps=120, batch=32, warmup=10, log_every=2, val_seqs=16,
                  model=["--preset", "tiny", "--n-experts", "16"]),
    "smoke": dict(seeds=1, steps=3, batch=16, warmup=1, log_every=1, val_seqs=4,
                  model=["--preset", "tiny", "--n-experts", "8", "--d-model", "32", "--n-heads", "2",
                         "--d-expert", "32", "--seq-len", "32"]),
}

STRATEGIES = ["none", "aux", "global_aux", "lossfree", "seq_aux", "expert_choice"]

# The main comparison, at the papers' settings: alpha = 1e-2 (Switch), u = 1e-3
# (Wang et al.). Knobs that a sweep varies are spelled out, so the sweep point
# with the same value is literally the same run and is trained once.
MAIN = {
    "none": ["--balancer", "none"],
    "aux": ["--balancer", "aux", "--alpha", "1e-2", "--balance-seqs", "2"],
    "global_aux": ["--balancer", "global_aux", "--alpha", "1e-2"],
    "lossfree": ["--balancer", "lossfree", "--bias-rate", "1e-3"],
    "seq_aux": ["--balancer", "seq_aux"],
    "expert_choice": ["--balancer", "expert_choice", "--route-seqs", "2"],
}


def sweeps(micro_seqs, large_chunk):
    """One sweep per paper figure: {sweep: [(label, flags), ...]}."""
    aux = lambda alpha, seqs: ["--balancer", "aux", "--alpha", alpha, "--balance-seqs", str(seqs)]
    ec = ["--balancer", "expert_choice", "--route-seqs"]
    return {
        # Wang et al. 2024, Fig. 2: a large alpha balances but costs perplexity.
        "alpha": [(f"aux alpha={a}", aux(a, 2)) for a in ("1e-2", "1e-3", "1e-4")],
        # Wang et al. 2024, Sec. 4.3: u = 1e-4 is too slow, 1e-2 oscillates.
        "bias_rate": [(f"lossfree u={u}", ["--balancer", "lossfree", "--bias-rate", u])
                      for u in ("1e-4", "1e-3", "1e-2")],
        # Qiu et al. 2025, Fig. 1b and Table 2: the balance batch, from one
        # sequence to one rank's micro-batch to the global batch.
        "balance_batch": [("aux, 1 seq", aux("1e-2", 1)),
                          ("aux, 2 seqs", aux("1e-2", 2)),
                          (f"aux, micro-batch ({micro_seqs} seqs)", aux("1e-2", micro_seqs)),
                          ("global_aux (global batch)", MAIN["global_aux"])],
        # Wang et al. 2024, Fig. 9: expert choice's loss against its routing chunk.
        "route": [("EC, chunk 1 seq", ec + ["1"]),
                  ("EC, chunk 2 seqs", MAIN["expert_choice"]),
                  (f"EC, chunk {large_chunk} seqs", ec + [str(large_chunk)]),
                  ("EC, chunk 1 seq, shuffled", ec + ["1", "--route-shuffle"])],
    }


def run_name(flags, seed):
    """A folder name that says what the run is, e.g. aux-alpha1e-2-balance-seqs2-s0."""
    parts, i = [flags[1]], 2
    while i < len(flags):
        key = flags[i].lstrip("-")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            parts.append(key + flags[i + 1])
            i += 2
        else:
            parts.append(key)
            i += 1
    return "-".join(parts) + f"-s{seed}"


class Plan:
    """Which runs to train and where each one is reported.

    points: {label: flags} for every strategy and sweep point; every point is
    trained with every seed. runs: {folder name: (flags, seed)}, each distinct
    run once, seed by seed, so that an interrupted comparison has whole seeds."""

    def __init__(self, seeds, micro_seqs, large_chunk):
        self.seeds = seeds
        self.sweeps = {g: [label for label, _ in pts] for g, pts in sweeps(micro_seqs, large_chunk).items()}
        self.points = dict(MAIN)
        for pts in sweeps(micro_seqs, large_chunk).values():
            self.points.update(pts)
        self.runs = {}
        for seed in seeds:
            for flags in self.points.values():
                self.runs.setdefault(run_name(flags, seed), (flags, seed))

    def names(self, label):
        """The runs of one point, one per seed."""
        return [run_name(self.points[label], s) for s in self.seeds]


def common_flags(size, steps, extra):
    """The train.py flags every run shares: same model, data and schedule."""
    s = SIZES[size]
    return s["model"] + ["--batch-size", str(s["batch"]), "--steps", str(steps), "--warmup", str(s["warmup"]),
                         "--eval-every", "0", "--log-every", str(s["log_every"]),
                         "--val-seqs", str(s["val_seqs"])] + extra


# ----------------------------------------------------------------------------
# 2. Running the plan.

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


STATES = ["new", "resume", "done"]


def run_state(run_dir, argv, steps):
    """'done': summary.json with the expected steps, made by exactly these flags
    (recorded in run.json). 'resume': an interrupted run of these flags left a
    checkpoint. 'new': anything else (start over)."""
    recorded = read_json(os.path.join(run_dir, "run.json")) or {}
    if recorded.get("argv") != argv:
        return "new"
    summary = read_json(os.path.join(run_dir, "summary.json")) or {}
    if summary.get("steps") == steps and "val_loss" in summary:
        return "done"
    return "resume" if os.path.exists(os.path.join(run_dir, "ckpt.pt")) else "new"


def agree(value, world_size):
    """Rank 0 decides, every rank follows (a small int): train.main is
    collective, so all ranks must train, skip or stop on the same runs."""
    if world_size == 1:
        return value
    t = torch.tensor([value])
    dist.broadcast(t, 0)
    return int(t.item())


def train_one(run_dir, argv, resume, rank):
    """Call train.main with this run's flags. Its text output goes to
    train.txt in the run folder (its tqdm bar still shows on the terminal).
    train.main takes over Ctrl-C to checkpoint cleanly; give it back after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flags = argv + ["--out", run_dir] + (["--resume"] if resume else ["--overwrite"])
    try:
        if rank != 0:
            return train.main(flags)
        os.makedirs(run_dir, exist_ok=True)
        stale = os.path.join(run_dir, "summary.json")
        if not resume and os.path.exists(stale):
            os.remove(stale)                     # from other flags: must not pass for this run's result
        with open(os.path.join(run_dir, "run.json"), "w") as f:
            json.dump({"argv": argv}, f)
        with open(os.path.join(run_dir, "train.txt"), "a") as out, redirect_stdout(out):
            return train.main(flags)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def run_plan(plan, common, steps, root, rank, world_size):
    """Train every run that is not finished yet, showing run i of N and an ETA.
    Returns how many runs were trained, or None if one was stopped (Ctrl-C,
    SIGTERM): run the same command again to go on."""
    say = print if rank == 0 else (lambda *a, **k: None)
    spent, trained, t0 = 0.0, 0, time.time()
    for i, (name, (flags, seed)) in enumerate(plan.runs.items(), 1):
        run_dir = os.path.join(root, "runs", name)
        argv = common + flags + ["--seed", str(seed)]
        state = STATES[agree(STATES.index(run_state(run_dir, argv, steps)) if rank == 0 else 0, world_size)]
        if state == "done":
            say(f"[{i}/{len(plan.runs)}] {name}: finished earlier, kept")
            continue
        eta = f", about {spent / trained * (len(plan.runs) - i + 1) / 60:.0f} min left" if trained else ""
        say(f"[{i}/{len(plan.runs)}] {name}{' (resuming)' if state == 'resume' else ''}{eta}", flush=True)
        start = time.time()
        code = train_one(run_dir, argv, state == "resume", rank)
        finished = code == 0 and (rank != 0 or os.path.exists(os.path.join(run_dir, "summary.json")))
        if not agree(int(finished), world_size):
            say(f"stopped during {name}; run the same command again to continue")
            return None
        took = time.time() - start
        spent, trained = spent + took, trained + 1
        if rank == 0:
            with open(os.path.join(run_dir, "run.json"), "w") as f:
                json.dump({"argv": argv, "elapsed_s": took}, f)
            ckpt = os.path.join(run_dir, "ckpt.pt")
            if os.path.exists(ckpt):
                os.remove(ckpt)                  # the report needs only the logs; keeps the folder small
            s = read_json(os.path.join(run_dir, "summary.json"))
            say(f"    val ppl {s['val_ppl']:.3f} | MaxVio_global {s['maxvio_global']:.3f} | "
                f"specialisation {s['specialization']:.3f} | {took:.0f} s", flush=True)
    say(f"trained {trained} run(s) in {(time.time() - t0) / 60:.1f} min")
    return trained


# ----------------------------------------------------------------------------
# 3. Reading the runs, and statistics over seeds.

def load_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics(run_dir):
    """The table's columns for one run, plus two figures from the log that the
    update-rate claim needs: MaxVio_batch over the first half of training (how
    fast balance is reached) and over the last quarter (does it stay balanced
    or oscillate), Wang et al. 2024, Sec. 4.3."""
    s, log = read_json(os.path.join(run_dir, "summary.json")), load_log(run_dir)
    vio = [r["maxvio_batch"] for r in log]
    return {"val_loss": s["val_loss"], "val_ppl": s["val_ppl"],
            **{f"ppl_{d}": s["val_ppl_by_domain"][d] for d in s["domains"]},
            "maxvio_global": s["maxvio_global"], "maxvio_batch": s["maxvio_batch"],
            "specialization": s["specialization"], "causal_leak": s["causal_leak"],
            "tokens_per_second": s["tokens_per_second"],
            "maxvio_early": mean(vio[:max(1, len(vio) // 2)]),
            "maxvio_late": mean(vio[-max(1, len(vio) // 4):])}


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):
    """Sample standard deviation; None for a single value (no noise estimate)."""
    if len(xs) < 2:
        return None
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


# Two-sided 95% quantiles of Student's t by degrees of freedom: with 3 seeds
# the interval is mean +- 4.30 standard errors, much wider than +- 2.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


class Stat:
    """One quantity over seeds: its values, mean, std, and the half-width of
    the 95% confidence interval of the mean (None with one seed)."""

    def __init__(self, values):
        self.values, self.n = list(values), len(values)
        self.mean, self.std = mean(self.values), std(self.values)
        self.half = None if self.std is None else T95.get(self.n - 1, 2.0) * self.std / math.sqrt(self.n)

    def __format__(self, spec):
        if self.std is None:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} ± {format(self.std, spec)}"


class Results:
    """Every run's metrics, looked up by plan point: results[label][column] is
    a Stat over seeds, and results.diff(a, b, column) the paired difference."""

    def __init__(self, root, plan):
        self.plan = plan
        self.rows = {n: metrics(os.path.join(root, "runs", n)) for n in plan.runs}
        self.domains = read_json(os.path.join(root, "runs", next(iter(plan.runs)), "summary.json"))["domains"]

    def per_seed(self, label, column):
        return [self.rows[n][column] for n in self.plan.names(label)]

    def __getitem__(self, label):
        return {c: Stat(self.per_seed(label, c)) for c in self.rows[self.plan.names(label)[0]]}

    def diff(self, a, b, column):
        """a - b seed by seed. Both runs of a seed share initialisation and
        batches, so most of the seed-to-seed noise cancels in the difference."""
        return Stat([x - y for x, y in zip(self.per_seed(a, column), self.per_seed(b, column))])


# ----------------------------------------------------------------------------
# 4. The claims.
#
# Each claim is split into parts, and each part is answered from a paired
# difference d (Stat over seeds) and its 95% interval:
#   "yes"      the interval lies on the claimed side of zero
#   "no"       the mean lies on the other side
#   "unclear"  the claimed direction, but the interval includes zero
# A "no worse than" part is "yes" when the mean is no worse, "no" when the
# interval lies on the worse side, and "unclear" in between: a difference
# hidden in the noise is not evidence that there is none.
# A claim holds if every part is "yes", does not hold if any part is "no", and
# is not measurable at this scale otherwise (or with a single seed).

def above(d):
    """The claim: a > b."""
    if d.half is None:
        return "unclear"
    return "yes" if d.mean - d.half > 0 else "no" if d.mean <= 0 else "unclear"


def below(d):
    """The claim: a < b."""
    return above(Stat([-v for v in d.values]))


def not_above(d):
    """The claim: a is no larger than b (e.g. perplexity no worse)."""
    if d.half is None:
        return "unclear"
    return "yes" if d.mean <= 0 else "no" if d.mean - d.half > 0 else "unclear"


def all_of(parts):
    """Several parts as one: any "no" wins, then any "unclear"."""
    return "no" if "no" in parts else "unclear" if "unclear" in parts else "yes"


def verdict(parts):
    return {"yes": "holds", "no": "does not hold", "unclear": "not measurable at this scale"}[all_of(parts)]


def show(d, spec=".3f"):
    """A paired difference as 'mean ± 95% half-width'."""
    return format(d.mean, spec) if d.half is None else f"{d.mean:+{spec}} ± {format(d.half, spec)}"


def claim_lossfree(r):
    """Claim 1 (Wang et al. 2024, Table 1): lossfree is far better balanced than
    the aux loss, at equal or better perplexity."""
    vio, ppl = r.diff("lossfree", "aux", "maxvio_global"), r.diff("lossfree", "aux", "val_ppl")
    lf, aux = r["lossfree"], r["aux"]
    far = "yes" if lf["maxvio_global"].mean <= 0.5 * aux["maxvio_global"].mean else "no"   # "far": at most half
    parts = [below(vio), far, not_above(ppl)]
    return ("Loss-free reaches a far lower MaxVio_global than the aux loss, at equal or better perplexity",
            verdict(parts),
            f"MaxVio_global {lf['maxvio_global']:.3f} (lossfree) vs {aux['maxvio_global']:.3f} (aux, alpha 1e-2), "
            f"paired difference {show(vio)}; val ppl {lf['val_ppl']:.3f} vs {aux['val_ppl']:.3f}, "
            f"difference {show(ppl)}.")


def claim_alpha(r):
    """Claim 2 (Wang et al. 2024, Fig. 2): the alpha dilemma. The small alpha
    "does not balance" if its MaxVio_global is nearer to no balancing than to
    alpha = 1e-2."""
    big, mid, small = r.plan.sweeps["alpha"]
    vio, ppl = r.diff(big, small, "maxvio_global"), r.diff(big, small, "val_ppl")
    v = {k: r[k]["maxvio_global"].mean for k in (big, mid, small, "none")}
    near_none = "yes" if abs(v[small] - v["none"]) < abs(v[small] - v[big]) else "no"
    parts = [below(vio), above(ppl), near_none]
    p = {k: r[k]["val_ppl"].mean for k in (big, mid, small)}
    return ("A large alpha balances but hurts perplexity; a small alpha does not balance",
            verdict(parts),
            f"alpha 1e-2 / 1e-3 / 1e-4: MaxVio_global {v[big]:.3f} / {v[mid]:.3f} / {v[small]:.3f} "
            f"(none {v['none']:.3f}), val ppl {p[big]:.3f} / {p[mid]:.3f} / {p[small]:.3f}; 1e-2 minus 1e-4: "
            f"MaxVio_global {show(vio)}, ppl {show(ppl)}.")


def claim_global(r):
    """Claim 3 (Qiu et al. 2025, Fig. 1b, Table 2): balancing over the global
    batch lets experts specialise by domain, and perplexity is no worse."""
    micro, glob = "aux", "global_aux"
    spec, ppl = r.diff(glob, micro, "specialization"), r.diff(glob, micro, "val_ppl")
    trend = "; ".join(f"{label}: {r[label]['specialization'].mean:.3f} / {r[label]['val_ppl'].mean:.3f}"
                      for label in r.plan.sweeps["balance_batch"])
    return ("Global-batch balancing gives higher per-domain specialisation than micro-batch balancing, "
            "and perplexity no worse",
            verdict([above(spec), not_above(ppl)]),
            f"specialisation {r[glob]['specialization']:.3f} (global_aux) vs {r[micro]['specialization']:.3f} "
            f"(aux over 2-sequence groups), difference {show(spec)}; val ppl {r[glob]['val_ppl']:.3f} vs "
            f"{r[micro]['val_ppl']:.3f}, difference {show(ppl)}. Balance-batch sweep (specialisation / ppl): {trend}.")


def claim_expert_choice(r):
    """Claim 4 (Zhou et al. 2022; Wang et al. 2024, Sec. 2.3, Fig. 9): expert
    choice is balanced by construction but is not causal. Token-choice runs set
    the floor of the causality probe (floating-point noise)."""
    ec = r["expert_choice"]
    one, _, large, shuffled = r.plan.sweeps["route"]
    floor = max(max(r.per_seed(b, "causal_leak")) for b in STRATEGIES if b != "expert_choice")
    balanced = "yes" if max(r.per_seed("expert_choice", "maxvio_global") +
                            r.per_seed("expert_choice", "maxvio_batch")) < 0.05 else "no"
    leaks = "yes" if min(r.per_seed("expert_choice", "causal_leak")) > max(1e-4, 100 * floor) else "no"
    drop, back = r.diff(one, large, "val_loss"), r.diff(shuffled, one, "val_loss")
    loss = {k: r[k]["val_loss"] for k in (one, large, shuffled)}
    return ("Expert choice is balanced by construction, but leaks future tokens: non-zero causality probe, "
            "and a loss that drops when the routing chunk shrinks and recovers when shuffled",
            verdict([balanced, leaks, below(drop), above(back)]),
            f"MaxVio_batch {ec['maxvio_batch']:.3f}, MaxVio_global {ec['maxvio_global']:.3f}; causality probe "
            f"{ec['causal_leak']:.2e} (token choice at most {floor:.1e}); val loss "
            f"{one.split(', ', 1)[1]} / {large.split(', ', 1)[1]} / {shuffled.split(', ', 1)[1]}: "
            f"{loss[one]:.4f} / {loss[large]:.4f} / {loss[shuffled]:.4f}; small minus large chunk {show(drop, '.4f')}, "
            f"shuffled minus small {show(back, '.4f')}.")


def claim_bias_rate(r):
    """Claim 5 (Wang et al. 2024, Sec. 4.3): the bias update rate u."""
    slow, mid, fast = r.plan.sweeps["bias_rate"]
    early, late = r.diff(slow, mid, "maxvio_early"), r.diff(fast, mid, "maxvio_late")
    vs_slow, vs_fast = r.diff(mid, slow, "val_ppl"), r.diff(mid, fast, "val_ppl")
    parts = [above(early), above(late), all_of([not_above(vs_slow), not_above(vs_fast)])]
    f = lambda col: " / ".join(f"{r[k][col].mean:.3f}" for k in (slow, mid, fast))
    return ("Update rate: 1e-4 balances slowly, 1e-2 oscillates, 1e-3 is a good middle",
            verdict(parts),
            f"u = 1e-4 / 1e-3 / 1e-2: MaxVio_batch over the first half of training {f('maxvio_early')}, over the "
            f"last quarter {f('maxvio_late')}, val ppl {f('val_ppl')}; 1e-4 minus 1e-3 early {show(early)}, "
            f"1e-2 minus 1e-3 late {show(late)}; ppl of 1e-3 minus 1e-4 {show(vs_slow)}, minus 1e-2 {show(vs_fast)}.")


def check_claims(r):
    """[(claim, verdict, numbers)] for the five claims. One seed gives no noise
    estimate, so then nothing is judged."""
    claims = [c(r) for c in (claim_lossfree, claim_alpha, claim_global, claim_expert_choice, claim_bias_rate)]
    if len(r.plan.seeds) < 2:
        claims = [(c, "not measurable at this scale (one seed: no noise estimate)", n) for c, _, n in claims]
    return claims


# ----------------------------------------------------------------------------
# 5. The plots (matplotlib's Agg backend: no display needed).

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, root, name):
    fig.savefig(os.path.join(root, name), dpi=110)
    pyplot().close(fig)
    return name


def plot_maxvio_batch(root, r):
    """MaxVio_batch over training for every strategy, mean over seeds with a
    band from the lowest to the highest seed (Wang et al. 2024, Fig. 3)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for b in STRATEGIES:
        logs = [load_log(os.path.join(root, "runs", n)) for n in r.plan.names(b)]
        n = min(len(lg) for lg in logs)
        steps = [rec["step"] for rec in logs[0][:n]]
        curves = list(zip(*[[rec["maxvio_batch"] for rec in lg[:n]] for lg in logs]))
        line, = ax.plot(steps, [mean(c) for c in curves], label=b)
        ax.fill_between(steps, [min(c) for c in curves], [max(c) for c in curves], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)",
           title=f"Load imbalance of each training batch ({len(r.plan.seeds)} seeds: mean, band min-max)")
    ax.legend()
    return save(fig, root, "maxvio_batch.png")


def plot_heatmaps(root, r):
    """How often each expert is chosen for tokens of each domain, from one
    sequence to the global batch as the balance batch (Qiu et al. 2025,
    Fig. 1b). First seed; uniform would be top_k / n_experts everywhere."""
    plt = pyplot()
    labels = r.plan.sweeps["balance_batch"]
    freqs = [read_json(os.path.join(root, "runs", r.plan.names(label)[0], "summary.json"))["expert_freq"]
             for label in labels]
    n_layers = len(freqs[0])
    vmax = max(v for f in freqs for layer in f for row in layer for v in row)
    fig, axes = plt.subplots(n_layers, len(labels), squeeze=False, layout="constrained",
                             figsize=(3.6 * len(labels), 1.5 + 1.3 * n_layers))
    for j, (label, freq) in enumerate(zip(labels, freqs)):
        for l in range(n_layers):
            ax = axes[l][j]
            im = ax.imshow(freq[l], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_yticks(range(len(r.domains)), r.domains)
            ax.set_xlabel("expert" if l == n_layers - 1 else "")
            ax.set_title(f"{label}\nlayer {l}" if l == 0 else f"layer {l}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="selection frequency")
    fig.suptitle(f"Expert selection per domain, validation set (seed {r.plan.seeds[0]})")
    return save(fig, root, "expert_selection.png")


def plot_bias(root, r):
    """Loss-free bias trajectories for each update rate u: MaxVio_batch, then
    every expert's bias in each layer, over training (Wang et al. 2024,
    Sec. 4.3). First seed."""
    plt = pyplot()
    labels = r.plan.sweeps["bias_rate"]
    logs = [load_log(os.path.join(root, "runs", r.plan.names(label)[0])) for label in labels]
    n_layers = len(logs[0][0]["bias"])
    fig, axes = plt.subplots(len(labels), 1 + n_layers, squeeze=False, layout="constrained",
                             figsize=(4 * (1 + n_layers), 2.6 * len(labels)))
    for i, (label, log) in enumerate(zip(labels, logs)):
        steps = [rec["step"] for rec in log]
        axes[i][0].plot(steps, [rec["maxvio_batch"] for rec in log], color="black")
        axes[i][0].set(title=f"{label}: MaxVio_batch", xlabel="step")
        for l in range(n_layers):
            for traj in zip(*[rec["bias"][l] for rec in log]):
                axes[i][1 + l].plot(steps, traj, lw=0.8)
            axes[i][1 + l].set(title=f"{label.replace('lossfree ', '')}: bias per expert, layer {l}", xlabel="step")
    return save(fig, root, "lossfree_bias.png")


def seeds_and_mean(ax, r, labels, x, y, color, **kw):
    """Each seed as a faint line, the mean over seeds bold on top. The faint
    lines show what the claims use: differences within a seed are often much
    smaller than the spread between seeds. x and y: a column name, or a list
    of positions (one per label)."""
    get = lambda col, label: r.per_seed(label, col) if isinstance(col, str) else [col[labels.index(label)]] * len(r.plan.seeds)
    xs = [get(x, label) for label in labels]                       # [label][seed]
    ys = [get(y, label) for label in labels]
    for s in range(len(r.plan.seeds)):
        ax.plot([v[s] for v in xs], [v[s] for v in ys], "-", color=color, alpha=0.25, lw=1, **kw)
    mx, my = [mean(v) for v in xs], [mean(v) for v in ys]
    ax.plot(mx, my, color=color, lw=2, **kw)
    return mx, my


def plot_alpha(root, r):
    """Perplexity against MaxVio_global: the aux-loss alpha sweep traces the
    dilemma, and lossfree sits off that curve (Wang et al. 2024, Fig. 2)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    labels = r.plan.sweeps["alpha"]
    mx, my = seeds_and_mean(ax, r, labels, "maxvio_global", "val_ppl", "tab:blue", marker="o",
                            label="aux loss, alpha sweep")
    for label, x, y in zip(labels, mx, my):
        ax.annotate(label.split(" ")[1], (x, y), textcoords="offset points", xytext=(6, 6))
    seeds_and_mean(ax, r, ["lossfree"], "maxvio_global", "val_ppl", "tab:red", marker="*", ms=14, label="lossfree")
    seeds_and_mean(ax, r, ["none"], "maxvio_global", "val_ppl", "gray", marker="x", ms=8, label="none")
    handles, names = ax.get_legend_handles_labels()
    n = len(r.plan.seeds) + 1                                       # keep only the bold (mean) entries
    ax.legend(handles[n - 1::n], names[n - 1::n], fontsize=8)
    ax.set(xlabel="MaxVio_global (lower: better balanced)", ylabel="validation perplexity",
           title=f"Balance vs perplexity (bold: mean of {len(r.plan.seeds)} seeds, faint: each seed)")
    return save(fig, root, "alpha_tradeoff.png")


def plot_balance_batch(root, r, sizes):
    """Perplexity and specialisation against the balance batch, from one
    sequence to the global batch (Qiu et al. 2025, Table 2)."""
    plt = pyplot()
    labels = r.plan.sweeps["balance_batch"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    for ax, col, name in ((axes[0], "val_ppl", "validation perplexity"), (axes[1], "specialization", "specialisation")):
        seeds_and_mean(ax, r, labels, sizes, col, "tab:blue", marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.set(xlabel="balance batch in sequences (last: global_aux)", ylabel=name,
               title=f"{name} (bold: mean, faint: each seed)")
    return save(fig, root, "balance_batch.png")


def plot_leak(root, r):
    """Expert choice's leak: validation loss for each routing chunk (Wang et
    al. 2024, Fig. 9), next to the causality probe of every strategy."""
    plt = pyplot()
    labels = r.plan.sweeps["route"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    _, my = seeds_and_mean(axes[0], r, labels, list(range(len(labels))), "val_loss", "tab:red", marker="o")
    for i, y in enumerate(my):
        axes[0].annotate(f"{y:.4f}", (i, y), textcoords="offset points", xytext=(0, 8), ha="center")
    axes[0].set_xticks(range(len(labels)), [label.replace("EC, ", "") for label in labels], rotation=12, fontsize=8)
    axes[0].set(ylabel="validation loss (nats/byte)", title="Expert choice: loss vs routing chunk (bold: mean)")
    leaks = [r[b]["causal_leak"].mean for b in STRATEGIES]
    axes[1].bar(STRATEGIES, [max(v, 1e-12) for v in leaks], color="tab:purple")
    axes[1].set_yscale("log")
    axes[1].tick_params(axis="x", rotation=25, labelsize=8)
    axes[1].set(ylabel="max |logit change| at t <= T/2", title="Causality probe (0 is causal; drawn at >= 1e-12)")
    return save(fig, root, "expert_choice_leak.png")


# ----------------------------------------------------------------------------
# 6. results.md and main.

COLUMNS = [("val ppl", "val_ppl", ".3f"), ("MaxVio_global", "maxvio_global", ".3f"),
           ("MaxVio_batch (mean)", "maxvio_batch", ".3f"), ("specialisation", "specialization", ".3f"),
           ("causal leak", "causal_leak", ".1e"), ("tokens/s", "tokens_per_second", ".0f")]


def table(rows, domains):
    """A markdown table; rows are (label, {column: Stat or number})."""
    cols = COLUMNS[:1] + [(f"ppl {d}", f"ppl_{d}", ".3f") for d in domains] + COLUMNS[1:]
    out = ["| run | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, m in rows:
        out.append(f"| {label} | " + " | ".join(format(m[key], spec) for _, key, spec in cols) + " |")
    return "\n".join(out)


SWEEP_TITLES = {"alpha": "Aux-loss coefficient alpha (Wang et al. 2024, Fig. 2)",
                "bias_rate": "Loss-free update rate u (Wang et al. 2024, Sec. 4.3)",
                "balance_batch": "Balance batch, from one sequence to the global batch (Qiu et al. 2025)",
                "route": "Expert-choice routing chunk (Wang et al. 2024, Fig. 9)"}


def write_results(root, args, common, r, claims, plots, wall, trained):
    """results.md: how it was made, the tables, the verdicts, the plots."""
    seeds = r.plan.seeds
    n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    elapsed = sum((read_json(os.path.join(root, "runs", name, "run.json")) or {}).get("elapsed_s", 0)
                  for name in r.plan.runs)
    lines = [
        "# Load-balancing strategies compared", "",
        f"Produced by `{' '.join(['python compare.py'] + [shlex.quote(a) for a in args.argv])}`.", "",
        f"- Every run: `python train.py {' '.join(common)} <strategy flags> --seed S`, i.e. "
        f"{args.steps} steps of {SIZES[args.size]['batch']} sequences, same initialisation and batches for "
        f"every strategy with the same seed.",
        f"- Every row: mean ± std over seeds {', '.join(map(str, seeds))} ({len(r.plan.runs)} runs in all).",
        f"- Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"{args.world_size} process(es), {args.threads} thread(s) each. Wall time of the runs, summed: "
        f"{elapsed / 60:.1f} min" + (f" (this invocation trained {trained} of them in {wall / 60:.1f} min)"
                                     if 0 < trained < len(r.plan.runs) else "") +
        ". tokens/s depends on what else the machine is doing.", "",
        f"## Main comparison ({n})", "",
        table([(b, r[b]) for b in STRATEGIES], r.domains), "", f"## Sweeps ({n})", ""]
    for g, labels in r.plan.sweeps.items():
        lines += [f"### {SWEEP_TITLES[g]}", "", table([(label, r[label]) for label in labels], r.domains), ""]
    lines += ["## Claims", "",
              "Each claim is checked with differences taken within a seed (same initialisation and batches), "
              "shown as mean ± the half-width of their 95% confidence interval (Student t over seeds). A part of "
              "a claim is confirmed when the interval excludes zero on the claimed side (for \"no worse\": when "
              "the mean is no worse); a claim holds when every part is confirmed, does not hold when a part goes "
              "the other way, and is not measurable at this scale when a difference is in the claimed direction "
              "but within the noise.", ""]
    lines += [f"{i}. *{claim}*: **{v}**. {numbers}" for i, (claim, v, numbers) in enumerate(claims, 1)]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Every run", "", table(list(r.rows.items()), r.domains), ""]
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines))


def parse_args(argv=None):
    p = train.OneLineParser(
        description="Train every load-balancing strategy with the same data, model and seeds, plus the sweeps "
                    "that mirror the papers' figures, then write results.md (tables and a verdict per paper "
                    "claim) and PNG plots. Finished runs are kept: run the same command again to resume or redraw.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: 2 seeds, 120 steps")
    size.add_argument("--smoke", action="store_true", help="under a minute: 1 seed, 3 steps, a toy model (tests)")
    p.add_argument("--out", default="compare_out", metavar="DIR",
                   help="results.md, the plots and runs/ go here (default: compare_out)")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 (default: 4; quick 2; smoke 1)")
    p.add_argument("--steps", type=int, metavar="N", help="steps of every run (default: 400; quick 120; smoke 3)")
    p.add_argument("--micro-seqs", type=int, metavar="S",
                   help="the 'micro-batch' point of the balance-batch sweep, in sequences (default: a quarter of "
                        "the global batch, what each of 4 data-parallel ranks would hold)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads per process (default: 1; for this small model one is fastest, and it "
                        "stays fast when the machine is busy)")
    p.add_argument("--train-args", default="", metavar="'FLAGS'",
                   help="extra train.py flags for every run, e.g. '--data mytext/'")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.size = "quick" if args.quick else "smoke" if args.smoke else "default"
    size = SIZES[args.size]
    args.seeds = size["seeds"] if args.seeds is None else args.seeds
    args.steps = size["steps"] if args.steps is None else args.steps
    for flag in ("seeds", "steps", "threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world_size, _ = train.setup_distributed()
    args.world_size = world_size
    batch = SIZES[args.size]["batch"]
    micro = args.micro_seqs or batch // 4
    large_chunk = batch // world_size          # the largest group one process can route
    if micro < 1 or (batch // world_size) % micro:
        raise ValueError(f"--micro-seqs {micro} must divide the {batch // world_size} sequences of each process")
    plan = Plan(list(range(args.seeds)), micro, large_chunk)
    common = common_flags(args.size, args.steps, shlex.split(args.train_args))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(f"{len(plan.runs)} runs: {len(plan.runs) // args.seeds} settings x {args.seeds} seed(s), {args.steps} steps "
              f"each, {world_size} process(es); output in {args.out}/")
    t0 = time.time()
    trained = run_plan(plan, common, args.steps, args.out, rank, world_size)
    if trained is None:
        return 1
    if rank != 0:
        return 0
    r = Results(args.out, plan)
    claims = check_claims(r)
    plots = [plot_maxvio_batch(args.out, r), plot_heatmaps(args.out, r), plot_bias(args.out, r),
             plot_alpha(args.out, r), plot_balance_batch(args.out, r, [1, 2, micro, batch]), plot_leak(args.out, r)]
    write_results(args.out, args, common, r, claims, plots, time.time() - t0, trained)
    for i, (claim, v, _) in enumerate(claims, 1):
        print(f"claim {i}: {v} -- {claim}")
    print(f"wrote {os.path.join(args.out, 'results.md')} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    train.cli(main)   # same one-line errors and clean shutdown as train.py
