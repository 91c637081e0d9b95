"""
compare.py -- check the papers' claims with numbers made here, the way the
papers measured them.

    python compare.py              # the full comparison: about 45 min on 2 CPU cores
    python compare.py --quick      # a few minutes: 2 seeds, short runs
    python compare.py --smoke      # seconds: does everything run?
    python compare.py --publish    # copy the results to results/ and the README

It teaches how to compare training recipes honestly:
  - each claim is tested with arms that differ only in what the paper
    varied (same gate, the paper's coefficients, same data), and the same
    seeds: two runs with the same seed share initialisation and batches;
  - differences are taken *within* a seed (paired), in nats for the loss,
    and weighed by a 95% t-interval over seeds;
  - a three-way verdict: "holds" if the interval lies on the claimed side,
    "contradicted" if it lies wholly on the other, "unresolved" otherwise --
    with the number of seeds that would resolve it at the measured spread.
    A mean inside its own interval never decides anything.

Read it top to bottom:
  1. the arms and the claims, each citing the table or figure it mirrors
  2. running the arms: train.py in parallel subprocesses, resumably
  3. reading a run, and the within-model shuffle test of expert choice
  4. statistics: intervals, the verdict rule, seeds needed
  5. the claims' parts, results.json and results.md
  6. plots, one per paper figure
  7. main
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import plumbing
import train
from balancers import BALANCERS
from data import load_corpus, val_batches

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------
# 1. The arms and the claims.

# Every run: the tiny model of train.py with 16 experts top-2, batches of 32
# sequences of 64 bytes, validation on up to 512 windows per domain (the whole
# split where it is smaller; the same windows for every run). The default
# size and seed counts were chosen from the paired spread of earlier runs
# (README, "How the scale was chosen").
SIZES = {
    "default": dict(steps=500, batch=32, warmup=25, val_seqs=512, seeds_scale=1.0,
                    model=["--preset", "tiny", "--n-experts", "16"]),
    "quick": dict(steps=150, batch=32, warmup=10, val_seqs=128, seeds_scale=0.0,
                  model=["--preset", "tiny", "--n-experts", "16"]),
    "smoke": dict(steps=3, batch=16, warmup=1, val_seqs=4, seeds_scale=-1.0,
                  model=["--preset", "tiny", "--n-experts", "8", "--d-model", "32", "--n-heads", "2",
                         "--d-expert", "32", "--seq-len", "32"]),
}
MICRO = 8          # Qiu et al.'s micro-batch: a quarter of the global batch (4 data-parallel ranks)


@dataclasses.dataclass
class Claim:
    key: str
    text: str            # the paper's claim, in one sentence
    source: str          # the table or figure it mirrors
    seeds: int           # at the default size; chosen from the measured spread
    arms: dict           # {label: train.py flags}; the parts below refer to them by position


def claims(size):
    """Every claim with its arms. A label is what a table row says; arms of
    equal settings (the same label in two claims, or the default strategy
    and its explicit twin) are the same runs, trained once."""
    batch = SIZES[size]["batch"]
    micro = min(MICRO, batch // 2)
    aux = lambda alpha, *more: ["--balancer", "aux", "--alpha", alpha, *more]
    ec = lambda seqs, *more: ["--balancer", "expert_choice", "--route-seqs", str(seqs), *more]
    sigmoid_aux = {f"aux sigmoid alpha={x}": aux(x, "--gate", "sigmoid") for x in ("1e-2", "1e-3", "1e-4", "0")}
    lossfree = lambda u: {f"lossfree u={u}": ["--balancer", "lossfree", "--bias-rate", u]}
    qiu = ["--domain-block", str(micro)]
    everyone = {name: ["--balancer", name] for name in BALANCERS}
    token_choice = {n: f for n, f in everyone.items() if BALANCERS[n].token_choice}
    return [
        Claim("lossfree", "Loss-free balancing reaches a lower MaxVio_global than the aux loss, at no worse "
                          "perplexity", "Wang et al. 2024, Table 2: sigmoid gate on both sides, alpha 1e-3", 10,
              {"aux sigmoid alpha=1e-3": sigmoid_aux["aux sigmoid alpha=1e-3"], **lossfree("1e-3")}),
        Claim("alpha", "A large alpha balances but costs perplexity; a small alpha does not balance",
              "Wang et al. 2024, Fig. 2: sigmoid gate", 6, {**sigmoid_aux, **lossfree("1e-3")}),
        Claim("softmax", "With the softmax gate, loss-free (proportional update) also balances better at no "
                         "worse perplexity", "Wang et al. 2024, App. C.2 and Table 6: softmax gate, alpha 3e-4", 6,
              {"aux softmax alpha=3e-4": aux("3e-4", "--gate", "softmax"),
               "lossfree softmax proportional": ["--balancer", "lossfree", "--gate", "softmax",
                                                 "--bias-update", "proportional"]}),
        Claim("global", "Balancing over the global batch instead of single-domain micro-batches lets experts "
                        "specialise by domain and lowers perplexity",
              "Qiu et al. 2025, Sec. 2.2, Fig. 1b and Table 1: every micro-batch from one domain", 8,
              {**{f"aux, {n} seq{'s' * (n > 1)}, one domain per {micro}": aux("1e-2", "--balance-seqs", str(n), *qiu)
                  for n in (1, 2, micro)},
               f"global_aux, one domain per {micro}": ["--balancer", "global_aux", *qiu]}),
        Claim("expert_choice", "Expert choice leaks future tokens: the causality probe is non-zero, and a model "
                               "trained with small routing chunks relies on the leak (its loss rises when its "
                               "chunks are shuffled), unlike one trained shuffled",
              "Wang et al. 2024, Sec. 5.2, App. D.2 and Fig. 9", 4,
              {"EC, chunk 1 seq": ec(1), "EC, chunk 2 seqs": ec(2), f"EC, chunk {batch} seqs": ec(batch),
               "EC, chunk 1 seq, trained shuffled": ec(1, "--route-shuffle"), **token_choice}),
        Claim("bias_rate", "Update rate: u = 1e-4 balances too slowly, u = 1e-2 oscillates late in training",
              "Wang et al. 2024, Sec. 4.3 and Fig. 4", 6, {**lossfree("1e-4"), **lossfree("1e-3"), **lossfree("1e-2")}),
        Claim("main", "(no verdict) every registered strategy at its own defaults", "all papers", 4, everyone),
    ]


def seeds_for(claim, size):
    """Default: the claim's own count. quick: 2 seeds. smoke: 1."""
    scale = SIZES[size]["seeds_scale"]
    return claim.seeds if scale > 0 else 2 if scale == 0 else 1


# ----------------------------------------------------------------------------
# 2. Running the arms.

def settings_key(flags, common):
    """What makes two runs the same run: the strategy's resolved settings and
    every other train.py flag. Two labels with equal keys share runs."""
    args = train.parse_args(common + flags)
    resolved = dataclasses.asdict(BALANCERS[args.balancer].settings(train.balance_config(args)))
    rest = {k: v for k, v in vars(args).items() if k not in resolved and k not in ("out", "seed")}
    return json.dumps({"strategy": resolved, **rest}, sort_keys=True, default=str)


class Plan:
    """Which runs to train: every arm with the largest seed count of the
    claims that use it. runs: {folder: (flags, seed)}; labels: {label: folder
    stem}; seeds: {label: [seed, ...]}."""

    def __init__(self, size, common, only_seeds=None, keys=None):
        self.size, self.common = size, common
        self.claims = [c for c in claims(size) if keys is None or c.key in keys]
        self.arms = {label: flags for c in self.claims for label, flags in c.arms.items()}
        self.seeds = {}
        for c in self.claims:
            for label in c.arms:
                n = seeds_for(c, size) if only_seeds is None else only_seeds
                self.seeds[label] = list(range(max(n, len(self.seeds.get(label, [])))))
        self.stem, self.runs = {}, {}
        for label, seeds in self.seeds.items():
            flags = self.arms[label]
            digest = hashlib.sha1(settings_key(flags, common).encode()).hexdigest()[:8]
            self.stem[label] = f"{flags[1]}-{digest}"
            for s in seeds:
                self.runs.setdefault(f"{self.stem[label]}-s{s}", (flags, s))

    def folder(self, label, seed):
        return f"{self.stem[label]}-s{seed}"


def run_state(run_dir, argv):
    """done: summary.json from exactly these flags; resume: an interrupted run
    of these flags left a checkpoint; new: anything else."""
    recorded = read_json(run_dir / "run.json") or {}
    if recorded.get("argv") != argv:
        return "new"
    if "val_loss" in (read_json(run_dir / "summary.json") or {}) and recorded.get("finished") \
            and (run_dir / "log.jsonl").is_file():          # the report reads the log too
        return "done"
    return "resume" if (run_dir / "ckpt.pt").exists() else "new"


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def train_one(run_dir, argv, state, launcher):
    """One train.py run in its own process (output in train.txt), then the
    measurements that need its checkpoint; the checkpoint is then deleted."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if state == "new":
        for stale in ("summary.json", "extra.json", "ckpt.pt", "log.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"argv": argv}))
    flags = argv + ["--out", str(run_dir)] + (["--resume"] if state == "resume" else [])
    start = time.time()
    with open(run_dir / "train.txt", "a") as log:
        if launcher:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            code = subprocess.call(launcher + [str(HERE / "train.py"), *flags], stdout=log, stderr=log, env=env,
                                   cwd=HERE)
        else:                       # one run at a time: in this process, which saves starting Python
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    code = train.main(flags)
                except (ValueError, FloatingPointError) as e:
                    print(f"error: {e}", file=log)
                    code = 2
            if code == 1:           # train.py stopped at a signal (Ctrl-C), checkpoint saved
                return None
    if code != 0:
        return False
    extra = {}
    if not BALANCERS[train.parse_args(argv).balancer].token_choice:
        extra = shuffled_routing_eval(run_dir)
    (run_dir / "extra.json").write_text(json.dumps(extra))
    (run_dir / "ckpt.pt").unlink(missing_ok=True)         # the report needs only the logs
    (run_dir / "run.json").write_text(json.dumps({"argv": argv, "finished": True, "elapsed_s": time.time() - start}))
    return True


def run_plan(plan, root, jobs, launcher, reuse=None):
    """Train every run that is not finished, `jobs` at a time. Returns how
    many it trained, or None if one failed or was stopped (run the same
    command again to go on: finished runs are kept, interrupted ones resume). A run that
    finished with exactly the same flags under `reuse` (another --out) is
    copied from there instead of trained again."""
    todo, copied = [], 0
    for name, (flags, seed) in plan.runs.items():
        argv = plan.common + flags + ["--seed", str(seed)]
        state = run_state(root / "runs" / name, argv)
        if state != "done" and reuse is not None and run_state(reuse / "runs" / name, argv) == "done":
            shutil.rmtree(root / "runs" / name, ignore_errors=True)
            shutil.copytree(reuse / "runs" / name, root / "runs" / name)
            state, copied = "done", copied + 1
        if state != "done":
            todo.append((name, argv, state))
    print(f"{len(plan.runs)} runs, {len(plan.runs) - len(todo) - copied} finished earlier"
          f"{f', {copied} copied from {reuse}' if copied else ''}; training {len(todo)} "
          f"with {jobs} at a time", flush=True)
    done, failed, t0 = 0, [], time.time()
    stopped = threading.Event()

    def one(item):
        name, argv, state = item
        if stopped.is_set():
            return name, None
        ok = train_one(root / "runs" / name, argv, state, launcher)
        return name, ok

    # Subprocesses run `jobs` at a time; in-process runs (launcher None) one
    # by one in the main thread, where train.py may install its signal handlers.
    # Ctrl-C stops the plan, whatever --jobs: the runs under way save a
    # checkpoint (they got the signal too), the ones not started never start.
    with ThreadPoolExecutor(jobs) if launcher else contextlib.nullcontext() as pool:
        try:
            for name, ok in (pool.map(one, todo) if launcher else map(one, todo)):
                if ok is None:
                    stopped.set()
                    break
                done += 1
                if not ok:
                    failed.append(name)
                left = (time.time() - t0) / done * (len(todo) - done) / 60
                print(f"[{done}/{len(todo)}] {name}: {'ok' if ok else 'FAILED (see its train.txt)'}"
                      f" | about {left:.0f} min left", flush=True)
        except KeyboardInterrupt:
            stopped.set()
    if stopped.is_set():
        print(f"stopped: {done} run(s) finished and kept, interrupted ones saved a checkpoint; run the same "
              f"command again to continue", flush=True)
        return None
    if failed:
        print(f"{len(failed)} run(s) did not finish, e.g. {root / 'runs' / failed[0] / 'train.txt'}; "
              f"run the same command again to continue")
        return None
    return len(todo)


# ----------------------------------------------------------------------------
# 3. Reading a run.

def shuffled_routing_eval(run_dir):
    """Wang et al. 2024's control for expert choice, within one trained model:
    its validation loss with routing groups made of whole sequences (as
    trained with small chunks) and with the tokens shuffled across groups,
    so a group holds almost nothing of any one sequence's future. A model
    that learnt to read the future from its routing loses when shuffled."""
    model, ckpt = plumbing.load_model(run_dir)
    args = argparse.Namespace(**ckpt["args"])
    proc = plumbing.Proc()
    corpus = load_corpus(args.data, seq_len=args.seq_len, log=lambda *a: None)
    batches = val_batches(corpus, args.seq_len, args.batch_size // args.grad_accum, args.val_seqs)
    out = {}
    for shuffle in (False, True):
        for layer in model.moe_layers():
            layer.balancer.cfg = dataclasses.replace(layer.balancer.cfg, route_shuffle=shuffle)
        out["val_loss_" + ("shuffled" if shuffle else "grouped")] = train.evaluate(model, corpus, batches, proc)["val_loss"]
    return out


def load_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def reversal_rate(log):
    """How often a bias update reverses the previous one, over the last
    quarter of training: near 1 when the bias overshoots back and forth
    every step (oscillation), lower when it drifts. From the logged bias
    (every step is logged in the comparison)."""
    biases = [torch.tensor(r["state"]["bias"]) for r in log if "bias" in r.get("state", {})]
    biases = biases[-max(3, len(biases) // 4):]
    if len(biases) < 3:
        return None                 # no bias to reverse: not a number, and not 0
    moves = torch.stack([b - a for a, b in zip(biases, biases[1:])])
    flips = (moves[1:] * moves[:-1]) < 0
    return flips.float().mean().item()


def metrics(run_dir):
    """The figures a claim may use, for one run."""
    s, log, extra = read_json(run_dir / "summary.json"), load_log(run_dir), read_json(run_dir / "extra.json") or {}
    vio = [r["maxvio_batch"] for r in log]
    q = max(1, len(vio) // 4)
    return {"val_loss": s["val_loss"], "val_ppl": s["val_ppl"],
            **{f"loss_{d}": s["val_loss_by_domain"][d] for d in s["domains"]},
            "maxvio_global": s["maxvio_global"], "maxvio_batch": s["maxvio_batch"],
            "maxvio_early": sum(vio[:q]) / q, "maxvio_late": sum(vio[-q:]) / q,
            "specialization": s["specialization"], "causal_leak": s["causal_leak"],
            "tokens_per_second": s["tokens_per_second"], "bias_reversals": reversal_rate(log),
            **({"shuffle_cost": extra["val_loss_shuffled"] - extra["val_loss_grouped"]} if extra else {})}


# ----------------------------------------------------------------------------
# 4. Statistics.

# Student t quantiles by degrees of freedom: two-sided 95% (for the interval)
# and one-sided 80% (for the power estimate). Beyond 30: the normal's.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
       0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855,
       0.854, 0.854]


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


MAX_SEEDS = 1000   # beyond this, "more seeds" is no longer a plan


def seeds_needed(mean, sd, target):
    """Seeds at which a difference of this mean and spread would leave `target`
    outside its 95% interval 80% of the time, taking the measured mean and
    spread as the truth (a rough guide: the spread itself comes from a few
    seeds). It would settle the claim on the side the mean lies on, which may
    be the side against it. None if the mean sits on the target or more than
    MAX_SEEDS would be needed."""
    gap = abs(mean - target)
    if sd is None or gap == 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if (t_quantile(T975, n - 1, 1.960) + t_quantile(T80, n - 1, 0.842)) * sd / math.sqrt(n) < gap:
            return n
    return None


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
            "claim": f"{side} {margin:g}", "seeds_to_resolve": seeds_needed(mean, sd, margin) if v == "unresolved" else None}


def combine(verdicts):
    """A claim holds if every part holds, is contradicted if any part is."""
    return "contradicted" if "contradicted" in verdicts else "holds" if all(v == "holds" for v in verdicts) else "unresolved"


# ----------------------------------------------------------------------------
# 5. The claims' parts.

MARGIN = 0.01   # nats: "equal perplexity" means the loss is worse by less than this (about 1% in perplexity)


class Results:
    """metrics of every run, by label and seed."""

    def __init__(self, root, plan):
        self.plan = plan
        self.rows = {name: metrics(root / "runs" / name) for name in plan.runs}

    def values(self, label, column, seeds=None):
        return [self.rows[self.plan.folder(label, s)][column]
                for s in (self.plan.seeds[label] if seeds is None else seeds)]

    def part(self, what, a, b, column, side, margin=0.0, unit="", seeds=None):
        """A paired difference a - b over the seeds both arms have (or `seeds`)."""
        seeds = seeds or [s for s in self.plan.seeds[a] if s in self.plan.seeds[b]]
        if not seeds:
            raise ValueError(f"arms {a!r} and {b!r} share no seed: nothing to pair")
        d = [x - y for x, y in zip(self.values(a, column, seeds), self.values(b, column, seeds))]
        return {"part": what, "a": a, "b": b, "metric": column, "unit": unit, **verdict(d, side, margin),
                **({"margin": margin} if margin else {})}

    def single(self, what, a, column, side, unit=""):
        """One arm's own figure against zero (e.g. a within-model difference)."""
        return {"part": what, "a": a, "b": None, "metric": column, "unit": unit,
                **verdict(self.values(a, column), side)}

    def exact(self, what, ok):
        """A part that is not statistical (the causality probe is exactly 0 or
        not): no noise to wait out, so a single failed check contradicts it."""
        return {"part": what, "verdict": "holds" if all(ok) else "contradicted",
                "seeds": len(ok), "unit": "", "metric": "causal_leak"}


def claim_parts(c, r):
    """The parts of a claim, from its arms in the order claims() lists them."""
    if c.key in ("lossfree", "softmax"):
        aux, lossfree = list(c.arms)
        return [r.part("MaxVio_global lower", lossfree, aux, "maxvio_global", "<"),
                r.part(f"val loss no worse (margin {MARGIN} nats)", lossfree, aux, "val_loss", "<", MARGIN, "nats")]
    if c.key == "alpha":
        big, _, small, _, lossfree = list(c.arms)
        return [r.part("alpha 1e-2 balances better than 1e-4 (MaxVio_global)", big, small, "maxvio_global", "<"),
                r.part("alpha 1e-2 costs loss against 1e-4", big, small, "val_loss", ">", 0.0, "nats"),
                r.part("alpha 1e-4 balances worse than loss-free (MaxVio_global)", small, lossfree, "maxvio_global", ">")]
    if c.key == "global":
        micro, glob = list(c.arms)[2:4]
        return [r.part("specialisation higher", glob, micro, "specialization", ">"),
                r.part("val loss lower", glob, micro, "val_loss", "<", 0.0, "nats")]
    if c.key == "expert_choice":
        leaky, _, _, control, *token_choice = list(c.arms)
        probe_ok = [v > 1e-4 for v in r.values(leaky, "causal_leak")] + \
                   [v == 0 for n in token_choice for v in r.values(n, "causal_leak")]
        return [r.exact("causality probe > 0 for expert choice, exactly 0 for every token-choice strategy", probe_ok),
                r.single("trained with 1-sequence chunks: loss rises when its chunks are shuffled", leaky,
                         "shuffle_cost", ">", "nats"),
                r.part("that rise exceeds the control's (trained shuffled)", leaky, control, "shuffle_cost", ">",
                       0.0, "nats")]
    if c.key == "bias_rate":
        slow, mid, fast = list(c.arms)
        return [r.part("u=1e-4 less balanced early (MaxVio_batch, first quarter)", slow, mid, "maxvio_early", ">"),
                r.part("u=1e-2 less balanced late (MaxVio_batch, last quarter)", fast, mid, "maxvio_late", ">"),
                r.part("u=1e-2's bias reverses direction more often late", fast, mid, "bias_reversals", ">")]
    return []


def judge(r):
    out = []
    for c in r.plan.claims:
        parts = claim_parts(c, r)
        out.append({"key": c.key, "claim": c.text, "source": c.source, "parts": parts,
                    "verdict": combine([p["verdict"] for p in parts]) if parts else None,
                    "seeds": len(r.plan.seeds[next(iter(c.arms))])})
    return out


def results_json(root, r, plan, judged, args, wall):
    runs = []
    for name, (flags, seed) in plan.runs.items():
        summary = read_json(root / "runs" / name / "summary.json")
        summary = {k: v for k, v in summary.items() if k not in ("args", "config")}
        runs.append({"run": name, "flags": plan.common + flags + ["--seed", str(seed)], "seed": seed,
                     "labels": [lbl for lbl in plan.seeds if plan.stem[lbl] == name.rsplit("-s", 1)[0]],
                     "metrics": r.rows[name], "summary": summary})
    return {"command": " ".join(["python compare.py"] + [shlex.quote(a) for a in args.argv]),
            "size": args.size, "steps": SIZES[args.size]["steps"], "wall_time_s": wall,
            "val_windows_per_domain": SIZES[args.size]["val_seqs"], "non_inferiority_margin_nats": MARGIN,
            "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
                        "jobs": args.jobs},
            "claims": judged, "arms": {lbl: {"flags": plan.arms[lbl], "seeds": plan.seeds[lbl]} for lbl in plan.seeds},
            "runs": runs}


def resolve_note(part):
    """What more seeds would do for an unresolved part, and which way."""
    if "diff" not in part or part.get("sd") is None:
        return ""
    n = part.get("seeds_to_resolve")
    if not n:
        return f" (more than {MAX_SEEDS} seeds: too small an effect for its spread)"
    side, margin = part["claim"].split()
    on_claimed_side = part["diff"] < float(margin) if side == "<" else part["diff"] > float(margin)
    return f" (~{n} seeds would resolve it, as {'holds' if on_claimed_side else 'contradicted'})"


def fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(res):
    """results.md (and the README's Results section) from results.json alone."""
    by_label = {}
    for run in res["runs"]:
        for lbl in run["labels"]:
            by_label.setdefault(lbl, []).append(run["metrics"])
    cols = [("val loss (nats)", "val_loss", ".4f"), ("val ppl", "val_ppl", ".3f"), ("MaxVio_global", "maxvio_global", ".3f"),
            ("MaxVio_batch", "maxvio_batch", ".3f"), ("specialisation", "specialization", ".3f"),
            ("causal leak", "causal_leak", ".1e")]
    mean_sd = lambda xs: f"{fmt(sum(xs) / len(xs))}" if len(xs) < 2 else \
        f"{sum(xs) / len(xs):.4g} ± {interval(xs)[1]:.2g}"
    # A second invocation only trains what is missing: say so, or its wall
    # time would read as the time the whole comparison takes.
    trained = res.get("runs_trained", len(res["runs"]))
    earlier = f" (it trained {trained} runs; {len(res['runs']) - trained} had finished earlier)" \
        if trained < len(res["runs"]) else ""
    lines = [f"Produced by `{res['command']}` in {res['wall_time_s'] / 60:.1f} min{earlier} "
             f"({res['machine']['cpus']} CPUs, "
             f"{res['machine']['jobs']} runs at a time, torch {res['machine']['torch']}); {res['steps']} steps per run, "
             f"validation on up to {res['val_windows_per_domain']} windows per domain. Rows: mean ± std over seeds.",
             "", "| arm | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for lbl, arm in res["arms"].items():
        rows = by_label.get(lbl, [])
        lines.append(f"| {lbl} | {len(rows)} | " + " | ".join(mean_sd([m[k] for m in rows]) for _, k, _ in cols) + " |")
    lines += ["", f"Verdicts: each part is a paired difference a - b within seed, mean and 95% t-interval; "
              f"**holds** if the interval lies on the claimed side, **contradicted** if wholly on the other, "
              f"**unresolved** otherwise, with the seeds that would resolve it (80% power) and which way, "
              f"if the measured mean and spread were the truth. "
              f"\"No worse\" uses a non-inferiority margin of {res['non_inferiority_margin_nats']} nats.", ""]
    for i, c in enumerate([c for c in res["claims"] if c["verdict"]], 1):
        lines += [f"{i}. *{c['claim']}* ({c['source']}; {c['seeds']} seed{'s' * (c['seeds'] > 1)}): "
                  f"**{c['verdict']}**", ""]
        lines += ["   | part | difference | 95% interval | seeds | verdict |", "   |---|---|---|---|---|"]
        for p in c["parts"]:
            diff = f"{fmt(p.get('diff'), '+.4f')} {p['unit']}".strip() if "diff" in p else "exact"
            ci = f"[{fmt(p.get('ci_low'), '+.4f')}, {fmt(p.get('ci_high'), '+.4f')}]" if "diff" in p else "-"
            more = resolve_note(p) if p["verdict"] == "unresolved" else ""
            lines.append(f"   | {p['part']} | {diff} | {ci} | {p['seeds']} | {p['verdict']}{more} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# 6. Plots (matplotlib's Agg backend: no display needed). Bold: mean over
# seeds; faint: each seed, since the claims rest on within-seed differences.

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, root, name):
    fig.savefig(root / name, dpi=110)
    pyplot().close(fig)
    return name


def curve(root, r, label, key="maxvio_batch"):
    """Steps and the mean over seeds of a logged figure."""
    logs = [load_log(root / "runs" / r.plan.folder(label, s)) for s in r.plan.seeds[label]]
    n = min(len(lg) for lg in logs)
    return [rec["step"] for rec in logs[0][:n]], [sum(lg[i][key] for lg in logs) / len(logs) for i in range(n)]


def claim_arms(r, key):
    return list(next(c for c in r.plan.claims if c.key == key).arms)


def plot_alpha(root, r):
    """Wang et al. 2024, Fig. 2: loss against MaxVio_global along the alpha
    sweep (sigmoid gate), with loss-free off the trade-off curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    *labels, lossfree = claim_arms(r, "alpha")
    for seed in r.plan.seeds[labels[0]]:
        ax.plot([r.rows[r.plan.folder(lbl, seed)]["maxvio_global"] for lbl in labels],
                [r.rows[r.plan.folder(lbl, seed)]["val_loss"] for lbl in labels], color="tab:blue", alpha=0.2)
    mx = [sum(r.values(lbl, "maxvio_global")) / len(r.values(lbl, "maxvio_global")) for lbl in labels]
    my = [sum(r.values(lbl, "val_loss")) / len(r.values(lbl, "val_loss")) for lbl in labels]
    ax.plot(mx, my, "o-", color="tab:blue", lw=2, label="aux loss, alpha sweep")
    for lbl, x, y in zip(labels, mx, my):
        ax.annotate(lbl.split("=")[1], (x, y), textcoords="offset points", xytext=(6, 6))
    softmax_aux, softmax_lossfree = claim_arms(r, "softmax")
    for lbl, color, marker in ((lossfree, "tab:red", "*"), (softmax_lossfree, "tab:orange", "P"),
                               (softmax_aux, "tab:green", "s")):
        ax.plot(sum(r.values(lbl, "maxvio_global")) / len(r.plan.seeds[lbl]),
                sum(r.values(lbl, "val_loss")) / len(r.plan.seeds[lbl]), marker, color=color, ms=12, label=lbl)
    ax.set(xlabel="MaxVio_global (lower: better balanced)", ylabel="validation loss (nats/byte)",
           title="Balance vs loss (bold: mean over seeds, faint: each seed)")
    ax.legend(fontsize=8)
    return save(fig, root, "alpha_tradeoff.png")


def plot_maxvio_batch(root, r):
    """Wang et al. 2024, Fig. 3: MaxVio_batch over training, with no
    balancing (alpha = 0) for reference."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for lbl in claim_arms(r, "lossfree") + [claim_arms(r, "alpha")[3]]:
        ax.plot(*curve(root, r, lbl), label=lbl)
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers and seeds)", title="Load imbalance of each training batch")
    ax.legend()
    return save(fig, root, "maxvio_batch.png")


def plot_bias_rate(root, r):
    """Wang et al. 2024, Fig. 4 and Sec. 4.3: MaxVio_batch for each update
    rate, and the first seed's bias trajectories in layer 0."""
    plt = pyplot()
    labels = claim_arms(r, "bias_rate")
    fig, axes = plt.subplots(1, 1 + len(labels), figsize=(16, 3.8), layout="constrained")
    for lbl in labels:
        axes[0].plot(*curve(root, r, lbl), label=lbl.split(" ")[1])
    axes[0].set(xlabel="step", ylabel="MaxVio_batch", title="balance over training")
    axes[0].legend()
    for ax, lbl in zip(axes[1:], labels):
        log = load_log(root / "runs" / r.plan.folder(lbl, r.plan.seeds[lbl][0]))
        steps = [rec["step"] for rec in log]
        for traj in zip(*[rec["state"]["bias"][0] for rec in log]):
            ax.plot(steps, traj, lw=0.7)
        ax.set(xlabel="step", title=f"{lbl.split(' ')[1]}: bias per expert, layer 0")
    return save(fig, root, "lossfree_bias.png")


def plot_global(root, r):
    """Qiu et al. 2025, Fig. 1b: how often each expert is chosen for tokens of
    each domain, micro-batch vs global-batch balancing (first seed, layer 0),
    and specialisation and loss along the balance batch."""
    plt = pyplot()
    labels = claim_arms(r, "global")
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), layout="constrained")
    for ax, lbl in zip(axes[:2], labels[2:4]):
        s = read_json(root / "runs" / r.plan.folder(lbl, r.plan.seeds[lbl][0]) / "summary.json")
        im = ax.imshow(s["expert_freq"][0], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(s["domains"])), s["domains"])
        ax.set(xlabel="expert", title=f"{lbl}\nlayer 0")
        fig.colorbar(im, ax=ax, shrink=0.8)
    x = list(range(len(labels)))
    for ax, col, name in ((axes[2], "specialization", "specialisation"), (axes[3], "val_loss", "val loss (nats)")):
        for seed in r.plan.seeds[labels[0]]:
            ax.plot(x, [r.rows[r.plan.folder(lbl, seed)][col] for lbl in labels], color="tab:blue", alpha=0.2)
        ax.plot(x, [sum(r.values(lbl, col)) / len(r.values(lbl, col)) for lbl in labels], "o-", lw=2)
        ax.set_xticks(x, ["1", "2", "micro", "global"])
        ax.set(xlabel="balance batch (sequences)", title=name)
    return save(fig, root, "global_batch.png")


def plot_expert_choice(root, r):
    """Wang et al. 2024, Fig. 9 and App. D.2: loss against the routing chunk, the
    within-model shuffle test, and the causality probe of every strategy."""
    plt = pyplot()
    chunks = claim_arms(r, "expert_choice")[:4]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), layout="constrained")
    axes[0].plot(range(len(chunks)), [sum(r.values(lbl, "val_loss")) / len(r.values(lbl, "val_loss")) for lbl in chunks], "o-")
    axes[0].set_xticks(range(len(chunks)), [lbl.replace("EC, ", "") for lbl in chunks], rotation=12, fontsize=8)
    axes[0].set(ylabel="validation loss (nats)", title="loss vs routing chunk (as trained)")
    costs = [r.values(lbl, "shuffle_cost") for lbl in chunks]
    axes[1].bar(range(len(chunks)), [sum(v) / len(v) for v in costs], color="tab:red")
    for i, v in enumerate(costs):
        axes[1].plot([i] * len(v), v, "k.", alpha=0.5)
    axes[1].set_xticks(range(len(chunks)), [lbl.replace("EC, ", "") for lbl in chunks], rotation=12, fontsize=8)
    axes[1].set(ylabel="loss shuffled - loss grouped (nats)", title="same model, chunks shuffled at evaluation")
    names = list(BALANCERS)
    leaks = [max(sum(r.values(n, "causal_leak")) / len(r.plan.seeds[n]), 1e-12) for n in names]
    axes[2].bar(names, leaks, color="tab:purple")
    axes[2].set_yscale("log")
    axes[2].tick_params(axis="x", rotation=25, labelsize=8)
    axes[2].set(ylabel="max |logit change| at t <= T/2", title="causality probe (0 is causal; drawn at >= 1e-12)")
    return save(fig, root, "expert_choice_leak.png")


# Each plot and the claims whose runs it draws.
PLOTS = [(plot_alpha, {"alpha", "softmax"}), (plot_maxvio_batch, {"lossfree", "alpha"}), (plot_bias_rate, {"bias_rate"}),
         (plot_global, {"global"}), (plot_expert_choice, {"expert_choice", "main"})]


# ----------------------------------------------------------------------------
# 7. main.

README_BEGIN, README_END = "<!-- compare.py results: begin -->", "<!-- compare.py results: end -->"


def results_md(res):
    return ("# The papers' claims, measured here\n\n" + markdown(res) + "\n" +
            "\n".join(f"![{p}]({p})" for p in res["plots"]) + "\n")


def checked_results(root):
    """OUT's results.json, refused with one line unless it is whole: it parses,
    its tables render, and every plot it lists is a file in OUT. Checked
    before anything is copied, so a damaged run never replaces a good one."""
    path = root / "results.json"
    if not path.is_file():
        raise ValueError(f"no {path} to publish: run python compare.py first")
    try:
        res = json.loads(path.read_bytes())
        plots = res["plots"]
        if not plots or not all(isinstance(p, str) and p and Path(p).name == p for p in plots):
            raise ValueError("no plots")
        pages = results_md(res), markdown(res)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path} is damaged or incomplete ({type(e).__name__}: {plumbing.first_line(e)[:80]}); "
                         f"run python compare.py again to rewrite it") from None
    missing = [p for p in plots if not (root / p).is_file()]
    if missing:
        raise ValueError(f"{path} lists plots that are not in {root}: {', '.join(missing)}; "
                         f"run python compare.py again to redraw them")
    return res, pages


def publish(root):
    """Copy results.json and the plots to results/, write results.md from
    results.json, and put it into the README between the markers."""
    dest = HERE / "results"
    res, (page, table) = checked_results(root)
    readme = (HERE / "README.md").read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError("README.md has no results markers to write between")
    dest.mkdir(exist_ok=True)
    for name in ["results.json"] + res["plots"]:
        shutil.copy(root / name, dest / name)
    (dest / "results.md").write_text(page)
    head, rest = readme.split(README_BEGIN, 1)
    body = table.replace("](", "](results/")
    body += "\n" + "\n".join(f"![{p}](results/{p})" for p in res["plots"]) + "\n"
    readme = head + README_BEGIN + "\n" + body + README_END + rest.split(README_END, 1)[1]
    (HERE / "README.md").write_text(readme)
    print(f"copied the results to {dest}/ and updated README.md")


def parse_args(argv=None):
    p = plumbing.OneLineParser(
        description="Train the arms of every paper claim (same data, model and seeds; each claim's arms differ "
                    "only in what the paper varied), then write results.json, results.md (tables and a three-way "
                    "verdict per claim) and the plots. Finished runs are kept: run the same command again to "
                    "resume or redraw.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: 2 seeds, 150 steps")
    size.add_argument("--smoke", action="store_true", help="seconds: 1 seed, 3 steps, a toy model (tests)")
    p.add_argument("--out", default="compare_out", metavar="DIR", help="results and runs/ go here (default: compare_out)")
    p.add_argument("--claims", type=lambda text: text.split(","), metavar="KEY,...",
                   help="only these claims' runs and verdicts, e.g. 'softmax' to add seeds to one claim "
                        f"(keys: {', '.join(c.key for c in claims('default'))}; main: every strategy at its "
                        f"defaults, for the tables, no verdict)")
    p.add_argument("--reuse", type=Path, metavar="DIR",
                   help="copy runs that finished with the same flags from DIR (another --out) instead of "
                        "training them again, e.g. to add seeds to one claim in a new folder")
    p.add_argument("--seeds", type=int, metavar="N", help="N seeds for every arm (default: per claim, chosen from "
                                                          "the measured spread; quick 2; smoke 1)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="runs at a time, one thread each (default: the number of CPUs)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per run (torchrun, expert parallel; default: 1)")
    p.add_argument("--train-args", default="", metavar="'FLAGS'", help="extra train.py flags for every run, "
                                                                      "e.g. '--data mytext/' or '--device cuda'")
    p.add_argument("--publish", action="store_true", help="copy OUT's results to results/ and the README, then stop")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.size = "quick" if args.quick else "smoke" if args.smoke else "default"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder: choose another --out")
    if args.reuse is not None and not (args.reuse / "runs").is_dir():
        raise ValueError(f"--reuse {args.reuse}: no runs/ folder there to copy finished runs from")
    unknown = set(args.claims or []) - {c.key for c in claims("default")}
    if unknown:
        raise ValueError(f"--claims: no claim {', '.join(sorted(unknown))}; see --help for the keys")
    for flag in ("seeds", "jobs", "nproc"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1 (got {value})")
    return args


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.out)
    if args.publish:
        publish(root)
        return 0
    size = SIZES[args.size]
    common = size["model"] + ["--batch-size", str(size["batch"]), "--steps", str(size["steps"]),
                              "--warmup", str(size["warmup"]), "--eval-every", "0", "--log-every", "1",
                              "--val-seqs", str(size["val_seqs"]), "--ckpt-every", str(max(1, size["steps"] // 4)),
                              *shlex.split(args.train_args)]
    train.check_args(train.parse_args(common), args.nproc)
    plan = Plan(args.size, common, args.seeds, args.claims)
    launcher = None if args.nproc == 1 and args.jobs == 1 else [sys.executable] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    torch.set_num_threads(1)          # like every run: one thread each
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trained = run_plan(plan, root, args.jobs, launcher, args.reuse)
    if trained is None:
        return 1
    wall = time.time() - t0
    r = Results(root, plan)
    judged = judge(r)
    res = results_json(root, r, plan, judged, args, wall)
    res["runs_trained"] = trained
    keys = {c.key for c in plan.claims}
    res["plots"] = [plot(root, r) for plot, needs in PLOTS if needs <= keys]
    (root / "results.json").write_text(plumbing.finite_json(res, indent=1))
    (root / "results.md").write_text(results_md(res))
    for c in judged:
        if c["verdict"]:
            print(f"{c['key']}: {c['verdict']} -- {c['claim']}")
    print(f"wall time {wall / 60:.1f} min; wrote {root / 'results.json'}, {root / 'results.md'} and "
          f"{len(res['plots'])} plots (python compare.py --publish copies them to results/ and the README)")
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
