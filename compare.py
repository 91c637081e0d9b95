"""
compare.py -- check the papers' claims with numbers made here, the way the
papers measured them.

    python compare.py --pilot      # the pilot: seeds 1000-1002, about 31 min on 2 CPU cores
    python compare.py              # the confirmatory run: at most 90 min on 2 CPU cores
    python compare.py --quick      # a few minutes: 2 seeds, short runs
    python compare.py --smoke      # seconds: does everything run?
    python compare.py --publish    # copy the results to results/, docs/results.md and the README

It teaches how to compare training recipes honestly:
  - each claim is tested with arms that differ only in what the paper
    varied (same gate, the paper's coefficients, same data), and the same
    seeds: two runs with the same seed share initialisation and batches;
  - differences are taken *within* a seed (paired), in nats for the loss,
    and weighed by a 95% t-interval over seeds;
  - a three-way verdict: "holds" if the interval lies on the claimed side,
    "contradicted" if it lies wholly on the other, "unresolved" otherwise --
    with the number of seeds that would resolve it at the measured spread.
    A mean inside its own interval never decides anything;
  - seeds fixed before looking: a pilot on seeds >= 1000 measures the
    spread, the confirmatory run uses fresh seeds 0..n-1 with n fixed from
    it, and is never extended; "no worse" is judged at a margin no larger
    than the paper's own effect, beside superiority; Holm-Bonferroni over
    every test of every claim holds the family-wise error at 5%.

Read it top to bottom:
  1. the arms and the claims, each citing the table or figure it mirrors
  2. running the arms: train.py in parallel subprocesses, resumably
  3. reading a run, and the within-model shuffle test of expert choice
  4. statistics: intervals, the verdict rule, seeds needed, p-values and Holm
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

# Every run: train.py's tiny preset (2 layers, width 64) on batches of 32
# sequences of 64 bytes, validation on up to 512 windows per domain (the whole
# split where it is smaller; the same windows for every run). Two shapes of
# MoE layer, with about the same expert parameters and active width:
#   "model"  16 routed experts top-2, each 64 wide (no shared expert)
#   "fine"   the DeepSeekMoE shape both papers trained (Wang et al.: 2
#            shared + 64 routed top-6; Qiu et al.: 4 shared + 64 routed
#            top-4), scaled down: 2 shared + 32 routed top-4, each 32 wide.
#            Claim 1 (lossfree), the alpha sweep and the computation batch.
SIZES = {
    "default": dict(steps=500, batch=32, warmup=25, val_seqs=512,
                    model=["--preset", "tiny", "--n-experts", "16"],
                    fine=["--n-experts", "32", "--top-k", "4", "--shared-experts", "2", "--d-expert", "32"]),
    "quick": dict(steps=150, batch=32, warmup=10, val_seqs=128,
                  model=["--preset", "tiny", "--n-experts", "16"],
                  fine=["--n-experts", "32", "--top-k", "4", "--shared-experts", "2", "--d-expert", "32"]),
    "smoke": dict(steps=3, batch=16, warmup=1, val_seqs=4,
                  model=["--preset", "tiny", "--n-experts", "8", "--d-model", "32", "--n-heads", "2",
                         "--d-expert", "32", "--seq-len", "32"],
                  fine=["--n-experts", "8", "--top-k", "2", "--shared-experts", "1", "--d-expert", "16"]),
}
QIU_MICRO = 1      # Qiu et al.'s micro-batch here: one sequence, so one domain; the global batch is 32x larger
CB_MID = 32        # "a moderate computation batch": the training batch, in sequences (Wang et al. Fig. 5)

# Seeds. A pilot on seeds PILOT_SEEDS measures each part's paired spread;
# the confirmatory run then uses seeds 0..n-1 with n fixed from the pilot
# (between MIN_SEEDS and the claim's `seeds`, the most the 90-minute budget
# allows) and never extended once results have been seen.
PILOT_SEEDS = list(range(1000, 1003))
MIN_SEEDS = 3


@dataclasses.dataclass
class Claim:
    key: str
    text: str            # the paper's claim, in one sentence
    source: str          # the table or figure it mirrors
    seeds: int           # the most seeds the confirmatory run may give it (the time budget's share)
    arms: dict           # {label: train.py flags}; the parts below refer to them by position


def claims(size):
    """Every claim with its arms. A label is what a table row says; arms of
    equal settings (the same label in two claims, or the default strategy
    and its explicit twin) are the same runs, trained once.

    Every alpha is the per-layer coefficient of the paper quoted, as in the
    papers: GPT.forward adds each layer's balance loss with the full alpha
    (Switch Sec. 2.2). Wang et al.'s sweep 1e-2 / 1e-3 / 1e-4 / 0 (Fig. 2),
    their softmax alpha 3e-4 (App. C.2) and Qiu et al.'s 0.008 (Table 4)
    are their own numbers, not rescaled."""
    batch, fine = SIZES[size]["batch"], SIZES[size]["fine"]
    aux = lambda alpha, *more: ["--balancer", "aux", "--alpha", alpha, *more]
    ec = lambda seqs, *more: ["--balancer", "expert_choice", "--route-seqs", str(seqs), *more]
    sigmoid_aux = {f"aux sigmoid alpha={x}": aux(x, "--gate", "sigmoid", *fine) for x in ("1e-2", "1e-3", "1e-4", "0")}
    wang_lossfree = {"lossfree u=1e-3": ["--balancer", "lossfree", "--bias-rate", "1e-3", *fine]}
    lossfree = lambda u: {f"lossfree u={u}, 16 experts": ["--balancer", "lossfree", "--bias-rate", u]}
    # Qiu et al. (Sec. 4.1, Table 4): softmax gate, z-loss, LBL weight 0.008,
    # every micro-batch of one domain; here micro-batches of one sequence.
    qiu = lambda *flags: [*flags, "--gate", "softmax", "--alpha", "0.008", "--z-loss", "1e-3",
                          "--domain-block", str(QIU_MICRO)]
    everyone = {name: ["--balancer", name] for name in BALANCERS}
    return [
        Claim("lossfree", "Loss-free balancing reaches a lower MaxVio_global than the aux loss, at better or no "
                          "worse perplexity",
              "Wang et al. 2024, Table 2: sigmoid gate on both sides, alpha 1e-3, DeepSeekMoE shape", 10,
              {"aux sigmoid alpha=1e-3": sigmoid_aux["aux sigmoid alpha=1e-3"], **wang_lossfree}),
        Claim("alpha", "A large alpha balances but costs perplexity; a small alpha does not balance",
              "Wang et al. 2024, Fig. 2: sigmoid gate, DeepSeekMoE shape", 10, {**sigmoid_aux, **wang_lossfree}),
        Claim("computation_batch", "Loss-free's balance keeps improving as the computation batch grows; the aux "
                                   "loss's levels off, so loss-free is better balanced from a moderate batch on",
              "Wang et al. 2024, Sec. 5.1 and Fig. 5: claim 1's models, MaxVio over computation batches of S "
              "validation sequences", 10,
              {"aux sigmoid alpha=1e-3": sigmoid_aux["aux sigmoid alpha=1e-3"], **wang_lossfree}),
        Claim("softmax", "With the softmax gate, loss-free (proportional update) also balances better at better or "
                         "no worse perplexity", "Wang et al. 2024, App. C.2 and Table 6: softmax gate, alpha 3e-4", 10,
              {"aux softmax alpha=3e-4": aux("3e-4", "--gate", "softmax"),
               "lossfree softmax proportional": ["--balancer", "lossfree", "--gate", "softmax",
                                                 "--bias-update", "proportional"]}),
        Claim("global", f"Balancing over the global batch ({batch} sequences) instead of single-domain micro-batches "
                        f"({QIU_MICRO} sequence) lets experts specialise by domain and lowers perplexity; a balance "
                        f"group of micro-batch size drawn across the global batch does as well",
              f"Qiu et al. 2025, Tables 1-2 and Fig. 1b: Balance BSZ {QIU_MICRO} -> {batch} "
              f"({batch // QIU_MICRO}x), softmax gate, alpha 0.008, z-loss 1e-3", 8,
              {**{f"aux, balance {n} seq{'s' * (n > 1)}": qiu("--balancer", "aux", "--balance-seqs", str(n))
                  for n in (QIU_MICRO, 2, 8)},
               f"global_aux, balance {batch} seqs": qiu("--balancer", "global_aux"),
               f"Shuffle LBL_micro, {QIU_MICRO} seq of tokens": qiu("--balancer", "aux", "--balance-seqs",
                                                                     str(QIU_MICRO), "--balance-shuffle")}),
        Claim("expert_choice", "Expert choice leaks future tokens: the causality probe is non-zero, its "
                               "teacher-forced loss understates its causal loss, and a model trained with small "
                               "routing chunks relies on the leak (its loss rises when its chunks are shuffled), "
                               "unlike one trained shuffled",
              "Wang et al. 2024, Sec. 5.2, App. D.2 and Fig. 9", 6,
              {"EC, chunk 1 seq": ec(1), "EC, chunk 2 seqs": ec(2), "EC, chunk 8 seqs": ec(8),
               "EC, chunk 1 seq, trained shuffled": ec(1, "--route-shuffle")}),
        Claim("bias_rate", "Update rate: u = 1e-4 balances too slowly, u = 1e-2 oscillates late in training",
              "Wang et al. 2024, Sec. 4.3 and Fig. 4", 6, {**lossfree("1e-4"), **lossfree("1e-3"), **lossfree("1e-2")}),
        Claim("main", "Every registered strategy at its own defaults; token choice is exactly causal", "all papers", 3,
              everyone),
    ]


def planned_seeds(claim, size, pilot=None):
    """How many seeds the confirmatory run gives a claim: from the pilot when
    there is one, else the claim's budget share. quick: 2. smoke: 1."""
    if size == "smoke":
        return 1
    if size == "quick":
        return 2
    if pilot and claim.key in pilot.get("seeds", {}):
        return pilot["seeds"][claim.key]
    return claim.seeds


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
    """Which runs to train. claim_seeds: {claim key: [seed, ...]}, the seeds
    every arm of that claim has (all its rows, parts and plots use exactly
    these); an arm gets the union of its claims' seeds. runs: {folder:
    (flags, seed)}; labels: {label: folder stem}; seeds: {label: [seed, ...]}.
    `only_seeds` (N) gives every claim seeds 0..N-1; `seed_lists` ({key:
    [seeds]}) sets them per claim (the pilot, or the frozen confirmatory plan)."""

    def __init__(self, size, common, only_seeds=None, keys=None, seed_lists=None):
        self.size, self.common = size, common
        self.claims = [c for c in claims(size) if keys is None or c.key in keys]
        self.arms = {label: flags for c in self.claims for label, flags in c.arms.items()}
        self.claim_seeds = {}
        for c in self.claims:
            n = planned_seeds(c, size) if only_seeds is None else only_seeds
            self.claim_seeds[c.key] = list(seed_lists[c.key]) if seed_lists else list(range(n))
        self.seeds = {}
        for c in self.claims:
            for label in c.arms:
                self.seeds[label] = sorted(set(self.seeds.get(label, [])) | set(self.claim_seeds[c.key]))
        self.stem, self.runs = {}, {}
        for label, seeds in self.seeds.items():
            flags = self.arms[label]
            digest = hashlib.sha1(settings_key(flags, common).encode()).hexdigest()[:8]
            self.stem[label] = f"{flags[1]}-{digest}"
            for s in seeds:
                self.runs.setdefault(f"{self.stem[label]}-s{s}", (flags, s))

    def folder(self, label, seed):
        return f"{self.stem[label]}-s{seed}"

    def estimate_minutes(self, jobs, measured=None):
        """Wall time of the runs not yet done, `jobs` at a time. measured:
        {stem: seconds per run} (the pilot's own runs); else the per-step
        times below, measured on a 2-core x86 machine with 2 runs at a time."""
        total = 0.0
        for name, (flags, _) in self.runs.items():
            stem = name.rsplit("-s", 1)[0]
            total += measured[stem] if measured and stem in measured else run_seconds(self.common + flags)
        return total / jobs / 60


# Seconds per optimizer step at the default size (two runs at a time on 2
# cores), and per run for starting Python, evaluating and, for expert choice,
# the causal evaluation (seq_len forwards per validation batch it covers).
STEP_SECONDS = {"model": 0.08, "fine": 0.12}
RUN_OVERHEAD_S, CAUSAL_EVAL_S = 8.0, 8.0


def run_seconds(argv):
    args = train.parse_args(argv)
    shape = "fine" if args.shared_experts else "model"
    causal = 0 if BALANCERS[args.balancer].token_choice else CAUSAL_EVAL_S
    return args.steps * STEP_SECONDS[shape] * (args.batch_size * args.seq_len) / 2048 + RUN_OVERHEAD_S + causal


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
        for folder in ("ckpt", plumbing.STAGE, plumbing.SWAP):   # a swap left half done would bring an old run back
            shutil.rmtree(run_dir / folder, ignore_errors=True)
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
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)   # (the index first: then no index names a lost folder)
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
    that learnt to read the future from its routing loses when shuffled.
    The evaluation draws a fresh permutation per batch, never one its
    training used (balancers.fresh_permutation), so a model trained shuffled
    is not evaluated on its own training regime."""
    model, ckpt = plumbing.load_model(run_dir)
    args = argparse.Namespace(**ckpt["args"])
    proc = plumbing.Proc()
    corpus = load_corpus(args.data, seq_len=args.seq_len, log=lambda *a: None)
    batches = val_batches(corpus, args.seq_len, args.batch_size // args.grad_accum, args.val_seqs)
    out = {}
    for shuffle in (False, True):
        for layer in model.moe_layers():
            layer.balancer.cfg = dataclasses.replace(layer.balancer.cfg, route_shuffle=shuffle)
        out["val_loss_" + ("shuffled" if shuffle else "grouped")] = \
            train.evaluate(model, corpus, batches, proc, causal_batches=0)["val_loss"]
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
    cb = dict(zip(s["maxvio_computation_batch"]["sizes"], s["maxvio_computation_batch"]["maxvio"]))
    mid = cb.get(CB_MID, cb[max(S for S in cb if S <= CB_MID)])
    causal = {"val_loss_causal": s["val_loss_causal"], "val_loss_forced_same_windows": s["val_loss_forced_same_windows"],
              "causal_gap": s["val_loss_causal"] - s["val_loss_forced_same_windows"]} if "val_loss_causal" in s else {}
    return {"val_loss": s["val_loss"], "val_ppl": s["val_ppl"], **causal,
            "cb_mid": mid, "cb_all": cb[max(cb)], "cb_fall": cb[max(cb)] - mid,
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


def apply_holm(judged):
    """verdict_holm for every statistical test of every part of every claim
    (each part's own test, and the superiority test of a "no worse" part),
    as one family: a part holds or is contradicted only if its test survives
    Holm's adjustment; the side is the one its interval lies on. Exact parts
    have no noise and keep their verdict."""
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


def combine(verdicts):
    """A claim holds if every part holds, is contradicted if any part is."""
    return "contradicted" if "contradicted" in verdicts else "holds" if all(v == "holds" for v in verdicts) else "unresolved"


def maxvio_noise_floor(n_tokens, n_experts, top_k, draws=200):
    """MaxVio of a perfectly random balanced router: every token takes k
    distinct experts uniformly at random. Counting noise alone makes the
    busiest expert exceed the mean, so MaxVio over n_tokens never reads 0;
    a measured MaxVio_batch near this floor is as balanced as chance allows.
    Mean over `draws` batches (seeded: the same figure every time)."""
    g = torch.Generator().manual_seed(0)
    picks = torch.rand(draws, n_tokens, n_experts, generator=g).topk(top_k, dim=-1).indices.reshape(draws, -1)
    load = torch.zeros(draws, n_experts).scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float))
    return train.max_violation(load).mean().item()


# ----------------------------------------------------------------------------
# 5. The claims' parts.

# Non-inferiority margins, declared before any run, each no larger than the
# effect the paper itself reports for that comparison (nats of val loss).
MARGINS = {
    "lossfree": (math.log(9.56 / 9.50), "Wang et al. Table 2 (1B): ln(9.56 / 9.50)"),
    "softmax": (math.log(9.604 / 9.599), "Wang et al. Table 6: ln(9.604 / 9.599)"),
    "global": (math.log(7.214 / 7.198), "Qiu et al. Table 2 (400B): shuffle vs global, ln(7.214 / 7.198)"),
}


class Results:
    """metrics of every run, by label and seed."""

    def __init__(self, root, plan):
        self.plan = plan
        self.rows = {name: metrics(root / "runs" / name) for name in plan.runs}

    def values(self, label, column, seeds=None):
        return [self.rows[self.plan.folder(label, s)][column]
                for s in (self.plan.seeds[label] if seeds is None else seeds)]

    def part(self, what, a, b, column, side, margin=0.0, unit="", seeds=None, paper=None):
        """A paired difference a - b over `seeds` (a claim's seeds, which
        both arms have). With a margin ("no worse"), also the superiority
        test: the same difference against 0."""
        seeds = seeds or [s for s in self.plan.seeds[a] if s in self.plan.seeds[b]]
        if not seeds:
            raise ValueError(f"arms {a!r} and {b!r} share no seed: nothing to pair")
        d = [x - y for x, y in zip(self.values(a, column, seeds), self.values(b, column, seeds))]
        out = {"part": what, "a": a, "b": b, "metric": column, "unit": unit, **verdict(d, side, margin)}
        if margin:
            out.update(margin=margin, superiority=verdict(d, side, 0.0))
        return {**out, **({"paper": paper} if paper else {})}

    def single(self, what, a, column, side, unit="", seeds=None, paper=None):
        """One arm's own figure against zero (e.g. a within-model difference)."""
        return {"part": what, "a": a, "b": None, "metric": column, "unit": unit,
                **verdict(self.values(a, column, seeds), side), **({"paper": paper} if paper else {})}

    def exact(self, what, ok):
        """A part that is not statistical (the causality probe is exactly 0 or
        not): no noise to wait out, so a single failed check contradicts it."""
        return {"part": what, "verdict": "holds" if all(ok) else "contradicted",
                "seeds": len(ok), "unit": "", "metric": "causal_leak"}


def claim_parts(c, r):
    """The parts of a claim, from its arms in the order claims() lists them,
    each on the claim's own seeds (every arm of the claim has them)."""
    seeds = r.plan.claim_seeds[c.key]
    part = lambda *a, **k: r.part(*a, seeds=seeds, **k)
    if c.key in ("lossfree", "softmax"):
        aux, lossfree = list(c.arms)
        margin, why = MARGINS[c.key]
        vio = "0.72 -> 0.04" if c.key == "lossfree" else "0.937 -> 0.027"
        return [part("MaxVio_global lower", lossfree, aux, "maxvio_global", "<", paper=f"MaxVio_global {vio}"),
                part(f"val loss better or no worse (margin {margin:.4f} nats: {why})", lossfree, aux, "val_loss",
                     "<", margin, "nats", paper=f"{-margin:+.4f} nats")]
    if c.key == "alpha":
        big, _, small, _, lossfree = list(c.arms)
        return [part("alpha 1e-2 balances better than 1e-4 (MaxVio_global)", big, small, "maxvio_global", "<"),
                part("alpha 1e-2 costs loss against 1e-4", big, small, "val_loss", ">", 0.0, "nats"),
                part("alpha 1e-4 balances worse than loss-free (MaxVio_global)", small, lossfree, "maxvio_global", ">")]
    if c.key == "computation_batch":
        aux, lossfree = list(c.arms)
        return [r.single(f"loss-free's MaxVio falls from S = {CB_MID} sequences to the whole set", lossfree,
                         "cb_fall", "<", seeds=seeds, paper="keeps improving (Fig. 5)"),
                part("the aux loss's falls less over the same range (levels off)", lossfree, aux, "cb_fall", "<",
                     paper="approximately constant when large (Fig. 5)"),
                part(f"loss-free lower at S = {CB_MID} sequences", lossfree, aux, "cb_mid", "<",
                     paper="Fig. 5, computation batches of 2048-token sequences")]
    if c.key == "global":
        micro, _, _, glob, shuffle = list(c.arms)
        margin, why = MARGINS["global"]
        return [part("specialisation higher (global vs micro)", glob, micro, "specialization", ">",
                     paper="domain-specific experts (Fig. 1b)"),
                part("val loss lower (global vs micro)", glob, micro, "val_loss", "<", 0.0, "nats",
                     paper=f"{math.log(7.214 / 7.347):+.4f} nats at the same 32x (Table 1, 400B: BSZ 4 -> 128)"),
                part("shuffle better than micro", shuffle, micro, "val_loss", "<", 0.0, "nats",
                     paper=f"{math.log(8.041 / 8.167):+.4f} nats (Table 2, 120B: micro 4, global 512, 128x)"),
                part(f"shuffle no worse than global (margin {margin:.4f} nats: {why})", shuffle, glob, "val_loss",
                     "<", margin, "nats", paper=f"{margin:+.4f} nats (400B, 512x)")]
    if c.key == "expert_choice":
        leaky, _, _, control = list(c.arms)
        probe_ok = [v > 0 for lbl in c.arms for v in r.values(lbl, "causal_leak", seeds)]
        return [r.exact("causality probe > 0 for every expert-choice arm", probe_ok),
                r.single("teacher-forced loss understates the causal loss (chunk 1)", leaky, "causal_gap", ">",
                         "nats", seeds=seeds, paper="leakage \"prevents reliable evaluation\" (Sec. 5.2)"),
                r.single("trained with 1-sequence chunks: loss rises when its chunks are shuffled", leaky,
                         "shuffle_cost", ">", "nats", seeds=seeds),
                part("that rise exceeds the control's (trained shuffled)", leaky, control, "shuffle_cost", ">",
                     0.0, "nats", paper="the ~10% drop at chunk 512 vanishes when shuffled (Fig. 9)")]
    if c.key == "bias_rate":
        slow, mid, fast = list(c.arms)
        return [part("u=1e-4 less balanced early (MaxVio_batch, first quarter)", slow, mid, "maxvio_early", ">"),
                part("u=1e-2 less balanced late (MaxVio_batch, last quarter)", fast, mid, "maxvio_late", ">"),
                part("u=1e-2's bias reverses direction more often late", fast, mid, "bias_reversals", ">")]
    if c.key == "main":
        causal = [BALANCERS[r.plan.arms[lbl][1]].token_choice for lbl in c.arms]
        ok = [(v == 0) == tc for lbl, tc in zip(c.arms, causal) for v in r.values(lbl, "causal_leak", seeds)]
        return [r.exact("causality probe exactly 0 for every token-choice strategy, > 0 for expert choice", ok)]
    return []


def judge(r):
    out = []
    for c in r.plan.claims:
        parts = claim_parts(c, r)
        out.append({"key": c.key, "claim": c.text, "source": c.source, "parts": parts, "arm_labels": list(c.arms),
                    "verdict": combine([p["verdict"] for p in parts]) if parts else None,
                    "seeds": r.plan.claim_seeds[c.key]})
    apply_holm(out)
    return out


def pilot_summary(judged, plan, root):
    """What the pilot measured and what it fixes: each part's paired mean and
    spread, the seeds that would resolve it at that spread (80% power, the
    mean taken as the truth), and each claim's confirmatory seed count: the
    most its parts need, at least MIN_SEEDS and at most the claim's budget
    share. Also the runs' own times, which size the confirmatory plan."""
    budget = {c.key: c.seeds for c in claims(plan.size)}
    spreads, seeds = {}, {}
    for c in judged:
        need = []
        for p in c["parts"]:
            if "diff" not in p:
                continue
            n = seeds_needed(p["diff"], p["sd"], float(p["claim"].split()[1])) if p["sd"] else None
            spreads[f"{c['key']}: {p['part']}"] = {"diff": p["diff"], "sd": p["sd"], "seeds_needed": n}
            need.append(n if n is not None else budget[c["key"]])
        seeds[c["key"]] = max(MIN_SEEDS, min(budget[c["key"]], max(need, default=MIN_SEEDS)))
    elapsed = {}
    for name in plan.runs:
        rec = read_json(root / "runs" / name / "run.json") or {}
        elapsed.setdefault(name.rsplit("-s", 1)[0], []).append(rec.get("elapsed_s", 0.0))
    return {"seeds_used": PILOT_SEEDS, "parts": spreads, "seeds": seeds,
            "run_seconds": {stem: sum(v) / len(v) for stem, v in elapsed.items()}}


def results_json(root, r, plan, judged, args, wall):
    runs = []
    for name, (flags, seed) in plan.runs.items():
        summary = read_json(root / "runs" / name / "summary.json")
        summary = {k: v for k, v in summary.items() if k not in ("args", "config")}
        runs.append({"run": name, "flags": plan.common + flags + ["--seed", str(seed)], "seed": seed,
                     "labels": [lbl for lbl in plan.seeds if plan.stem[lbl] == name.rsplit("-s", 1)[0]],
                     "metrics": r.rows[name], "summary": summary})
    floors = {}
    for lbl in plan.seeds:
        a = train.parse_args(plan.common + plan.arms[lbl])
        if BALANCERS[a.balancer].token_choice:
            floors[lbl] = maxvio_noise_floor(a.batch_size * a.seq_len, a.n_experts, a.top_k)
    return {"command": " ".join(["python compare.py"] + [shlex.quote(a) for a in args.argv]),
            "size": args.size, "steps": SIZES[args.size]["steps"], "wall_time_s": wall,
            "val_windows_per_domain": SIZES[args.size]["val_seqs"],
            "margins_nats": {k: {"margin": m, "source": why} for k, (m, why) in MARGINS.items()},
            "maxvio_batch_noise_floor": floors,
            "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
                        "jobs": args.jobs},
            "claims": judged, "claim_seeds": plan.claim_seeds,
            "arms": {lbl: {"flags": plan.arms[lbl], "seeds": plan.seeds[lbl]} for lbl in plan.seeds},
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
    at = " at the paper's margin" if float(margin) else ""
    return f" (unresolved{at}: ~{n} seeds would resolve it, as {'holds' if on_claimed_side else 'contradicted'})"


def fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


COLUMNS = [("val loss (nats)", "val_loss", ".4f"), ("val ppl", "val_ppl", ".3f"),
           ("MaxVio_global", "maxvio_global", ".3f"), ("MaxVio_batch", "maxvio_batch", ".3f"),
           ("specialisation", "specialization", ".3f"), ("causal leak", "causal_leak", ".1e")]


def claim_table(res, c):
    """One claim's arms on exactly the claim's seeds, with the MaxVio_batch
    noise floor beside MaxVio_batch; expert-choice rows add the causal loss
    and mark the teacher-forced one as leaky."""
    by_run = {(lbl, run["seed"]): run["metrics"] for run in res["runs"] for lbl in run["labels"]}
    mean_sd = lambda xs: fmt(xs[0], ".4g") if len(xs) < 2 else f"{sum(xs) / len(xs):.4g} ± {interval(xs)[1]:.2g}"
    head = [name for name, _, _ in COLUMNS] + ["MaxVio_batch floor", "causal val loss (EC)"]
    lines = ["| arm | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for lbl in c["arm_labels"]:
        rows = [by_run[lbl, s] for s in c["seeds"]]
        cells = [mean_sd([m[k] for m in rows]) for _, k, _ in COLUMNS]
        if "val_loss_causal" in rows[0]:
            cells[0] += " (teacher-forced: leaky)"
        floor = res["maxvio_batch_noise_floor"].get(lbl)
        causal = "-" if "val_loss_causal" not in rows[0] else \
            f"{mean_sd([m['val_loss_causal'] for m in rows])} (teacher-forced, same windows: " \
            f"{mean_sd([m['val_loss_forced_same_windows'] for m in rows])})"
        cells += [fmt(floor), causal]
        lines.append(f"| {lbl} | " + " | ".join(cells) + " |")
    return lines


def markdown(res):
    """results.md (and the README's Results section) from results.json alone."""
    # A second invocation only trains what is missing: say so, or its wall
    # time would read as the time the whole comparison takes.
    trained = res.get("runs_trained", len(res["runs"]))
    earlier = f" (it trained {trained} runs; {len(res['runs']) - trained} had finished earlier)" \
        if trained < len(res["runs"]) else ""
    lines = [f"Produced by `{res['command']}` in {res['wall_time_s'] / 60:.1f} min{earlier} "
             f"({res['machine']['cpus']} CPUs, "
             f"{res['machine']['jobs']} runs at a time, torch {res['machine']['torch']}); {res['steps']} steps per run, "
             f"validation on up to {res['val_windows_per_domain']} windows per domain. Each claim's table and "
             f"differences use exactly the claim's seeds; rows: mean ± std over them. The MaxVio_batch floor is "
             f"what a perfectly random balanced router reads at the run's batch size.", ""]
    pilot = res.get("pilot")
    if pilot and "seeds" in pilot:
        lines += [f"Seeds per claim fixed before this run from a pilot on seeds {pilot['seeds_used'][0]}.."
                  f"{pilot['seeds_used'][-1]}: " + ", ".join(f"{k} {n}" for k, n in pilot["seeds"].items()) + ".", ""]
    lines += ["Verdicts: each part is a paired difference a - b within seed, mean and 95% t-interval; "
              "**holds** if the interval lies on the claimed side, **contradicted** if wholly on the other, "
              "**unresolved** otherwise, with the seeds that would resolve it (80% power) and which way, "
              "if the measured mean and spread were the truth. \"Better or no worse\" parts report "
              "non-inferiority at a margin no larger than the paper's own effect and superiority (below 0). "
              "Holm: the verdict after Holm-Bonferroni over every test of every claim (family-wise 5%).", ""]
    for i, c in enumerate([c for c in res["claims"] if c["verdict"]], 1):
        n = len(c["seeds"])
        lines += [f"{i}. *{c['claim']}* ({c['source']}; {n} seed{'s' * (n > 1)}): **{c['verdict']}** "
                  f"(Holm: {c['verdict_holm']})", ""]
        lines += ["   " + line for line in claim_table(res, c)] + [""]
        lines += ["   | part | difference | 95% interval | seeds | verdict | Holm | paper |",
                  "   |---|---|---|---|---|---|---|"]
        for p in c["parts"]:
            diff = f"{fmt(p.get('diff'), '+.4f')} {p['unit']}".strip() if "diff" in p else "exact"
            ci = f"[{fmt(p.get('ci_low'), '+.4f')}, {fmt(p.get('ci_high'), '+.4f')}]" if "diff" in p else "-"
            more = resolve_note(p) if p["verdict"] == "unresolved" else ""
            sup = p.get("superiority")
            sup_note = f"; superiority: {sup['verdict']} (Holm: {sup['verdict_holm']})" if sup else ""
            lines.append(f"   | {p['part']} | {diff} | {ci} | {p['seeds']} | {p['verdict']}{more}{sup_note} | "
                         f"{p['verdict_holm']} | {p.get('paper', '-')} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# 6. Plots (matplotlib's Agg backend: no display needed). Bold: mean over
# seeds; faint: each seed, since the claims rest on within-seed differences.
# Each plot draws a claim's arms on exactly that claim's seeds.

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, root, name):
    fig.savefig(root / name, dpi=110)
    pyplot().close(fig)
    return name


def curve(root, r, label, seeds, key="maxvio_batch"):
    """Steps and the mean over `seeds` of a logged figure."""
    logs = [load_log(root / "runs" / r.plan.folder(label, s)) for s in seeds]
    n = min(len(lg) for lg in logs)
    return [rec["step"] for rec in logs[0][:n]], [sum(lg[i][key] for lg in logs) / len(logs) for i in range(n)]


def claim_arms(r, key):
    """A claim's arm labels and its seeds."""
    return list(next(c for c in r.plan.claims if c.key == key).arms), r.plan.claim_seeds[key]


def mean(xs):
    return sum(xs) / len(xs)


def plot_alpha(root, r):
    """Wang et al. 2024, Fig. 2: loss against MaxVio_global along the alpha
    sweep (sigmoid gate), with loss-free off the trade-off curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    (*labels, lossfree), seeds = claim_arms(r, "alpha")
    for seed in seeds:
        ax.plot([r.rows[r.plan.folder(lbl, seed)]["maxvio_global"] for lbl in labels],
                [r.rows[r.plan.folder(lbl, seed)]["val_loss"] for lbl in labels], color="tab:blue", alpha=0.2)
    mx = [mean(r.values(lbl, "maxvio_global", seeds)) for lbl in labels]
    my = [mean(r.values(lbl, "val_loss", seeds)) for lbl in labels]
    ax.plot(mx, my, "o-", color="tab:blue", lw=2, label="aux loss, alpha sweep")
    for lbl, x, y in zip(labels, mx, my):
        ax.annotate(lbl.split("=")[1], (x, y), textcoords="offset points", xytext=(6, 6))
    ax.plot(mean(r.values(lossfree, "maxvio_global", seeds)), mean(r.values(lossfree, "val_loss", seeds)), "*",
            color="tab:red", ms=12, label=lossfree)
    ax.set(xlabel="MaxVio_global (lower: better balanced)", ylabel="validation loss (nats/byte)",
           title=f"Balance vs loss, DeepSeekMoE shape ({len(seeds)} seeds; faint: each seed)")
    ax.legend(fontsize=8)
    return save(fig, root, "alpha_tradeoff.png")


def plot_softmax(root, r):
    """Wang et al. 2024, App. C.2 / Table 6: the softmax-gate pair, each seed
    as a line from aux to loss-free in (MaxVio_global, loss)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    (aux, lossfree), seeds = claim_arms(r, "softmax")
    for lbl, color in ((aux, "tab:green"), (lossfree, "tab:orange")):
        ax.plot(r.values(lbl, "maxvio_global", seeds), r.values(lbl, "val_loss", seeds), "o", color=color,
                alpha=0.4)
        ax.plot(mean(r.values(lbl, "maxvio_global", seeds)), mean(r.values(lbl, "val_loss", seeds)), "s",
                color=color, ms=11, label=lbl)
    ax.set(xlabel="MaxVio_global", ylabel="validation loss (nats/byte)", title=f"Softmax gate ({len(seeds)} seeds)")
    ax.legend(fontsize=8)
    return save(fig, root, "softmax.png")


def plot_maxvio_batch(root, r):
    """Wang et al. 2024, Fig. 3: MaxVio_batch over training, with no
    balancing (alpha = 0) for reference and the noise floor of a random
    balanced router at this batch size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    labels, seeds = claim_arms(r, "lossfree")
    alpha_labels, alpha_seeds = claim_arms(r, "alpha")
    for lbl in labels:
        ax.plot(*curve(root, r, lbl, seeds), label=lbl)
    ax.plot(*curve(root, r, alpha_labels[3], alpha_seeds), label=alpha_labels[3])
    a = train.parse_args(r.plan.common + r.plan.arms[labels[0]])
    ax.axhline(maxvio_noise_floor(a.batch_size * a.seq_len, a.n_experts, a.top_k), color="grey", ls="--",
               label="noise floor (random balanced router)")
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers and seeds)", title="Load imbalance of each training batch")
    ax.legend()
    return save(fig, root, "maxvio_batch.png")


def plot_computation_batch(root, r):
    """Wang et al. 2024, Fig. 5: MaxVio over computation batches of S
    validation sequences against S, for claim 1's two models."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    labels, seeds = claim_arms(r, "computation_batch")
    for lbl, color in zip(labels, ("tab:blue", "tab:red")):
        curves = [read_json(root / "runs" / r.plan.folder(lbl, s) / "summary.json")["maxvio_computation_batch"]
                  for s in seeds]
        for cv in curves:
            ax.plot(cv["sizes"], cv["maxvio"], color=color, alpha=0.2)
        ax.plot(curves[0]["sizes"], [mean(v) for v in zip(*[cv["maxvio"] for cv in curves])], "o-", color=color,
                lw=2, label=lbl)
    ax.axvline(CB_MID, color="grey", ls=":", label=f"S = {CB_MID} (the training batch)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="computation batch S (validation sequences)", ylabel="MaxVio over batches of S",
           title=f"Balance per computation batch ({len(seeds)} seeds)")
    ax.legend(fontsize=8)
    return save(fig, root, "computation_batch.png")


def plot_bias_rate(root, r):
    """Wang et al. 2024, Fig. 4 and Sec. 4.3: MaxVio_batch for each update
    rate, and the first seed's bias trajectories in layer 0."""
    plt = pyplot()
    labels, seeds = claim_arms(r, "bias_rate")
    fig, axes = plt.subplots(1, 1 + len(labels), figsize=(16, 3.8), layout="constrained")
    for lbl in labels:
        axes[0].plot(*curve(root, r, lbl, seeds), label=lbl.split(",")[0])
    axes[0].set(xlabel="step", ylabel="MaxVio_batch", title="balance over training")
    axes[0].legend()
    for ax, lbl in zip(axes[1:], labels):
        log = load_log(root / "runs" / r.plan.folder(lbl, seeds[0]))
        steps = [rec["step"] for rec in log]
        for traj in zip(*[rec["state"]["bias"][0] for rec in log]):
            ax.plot(steps, traj, lw=0.7)
        ax.set(xlabel="step", title=f"{lbl.split(',')[0]}: bias per expert, layer 0")
    return save(fig, root, "lossfree_bias.png")


def plot_global(root, r):
    """Qiu et al. 2025, Fig. 1b: how often each expert is chosen for tokens of
    each domain, micro-batch vs global-batch balancing (first seed, layer 0),
    and specialisation and loss along the balance batch, the shuffle control
    beside it."""
    plt = pyplot()
    labels, seeds = claim_arms(r, "global")
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8), layout="constrained")
    for ax, lbl in zip(axes[:2], (labels[0], labels[3])):
        s = read_json(root / "runs" / r.plan.folder(lbl, seeds[0]) / "summary.json")
        im = ax.imshow(s["expert_freq"][0], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(s["domains"])), s["domains"])
        ax.set(xlabel="expert", title=f"{lbl}\nlayer 0")
        fig.colorbar(im, ax=ax, shrink=0.8)
    x = list(range(len(labels)))
    ticks = [lbl.split(", ")[-1].replace("balance ", "") for lbl in labels[:4]] + ["shuffle"]
    for ax, col, name in ((axes[2], "specialization", "specialisation"), (axes[3], "val_loss", "val loss (nats)")):
        for seed in seeds:
            ax.plot(x, [r.rows[r.plan.folder(lbl, seed)][col] for lbl in labels], color="tab:blue", alpha=0.2)
        ax.plot(x, [mean(r.values(lbl, col, seeds)) for lbl in labels], "o-", lw=2)
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set(xlabel="balance group", title=f"{name} ({len(seeds)} seeds)")
    return save(fig, root, "global_batch.png")


def plot_expert_choice(root, r):
    """Wang et al. 2024, Fig. 9 and App. D.2: teacher-forced and causal loss
    against the routing chunk, the within-model shuffle test, and the
    causality probe of every strategy."""
    plt = pyplot()
    chunks, seeds = claim_arms(r, "expert_choice")
    names = [lbl.replace("EC, ", "") for lbl in chunks]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), layout="constrained")
    for col, name in (("val_loss_forced_same_windows", "teacher-forced (leaky)"),
                      ("val_loss_causal", "causal (as generated)")):
        axes[0].plot(range(len(chunks)), [mean(r.values(lbl, col, seeds)) for lbl in chunks], "o-", label=name)
    axes[0].set_xticks(range(len(chunks)), names, rotation=12, fontsize=8)
    axes[0].set(ylabel="validation loss (nats)", title="loss vs routing chunk (the causal evaluation's windows)")
    axes[0].legend(fontsize=8)
    costs = [r.values(lbl, "shuffle_cost", seeds) for lbl in chunks]
    axes[1].bar(range(len(chunks)), [mean(v) for v in costs], color="tab:red")
    for i, v in enumerate(costs):
        axes[1].plot([i] * len(v), v, "k.", alpha=0.5)
    axes[1].set_xticks(range(len(chunks)), names, rotation=12, fontsize=8)
    axes[1].set(ylabel="loss shuffled - loss grouped (nats)", title="same model, chunks shuffled at evaluation")
    everyone, main_seeds = claim_arms(r, "main")
    leaks = [max(mean(r.values(n, "causal_leak", main_seeds)), 1e-12) for n in everyone]
    axes[2].bar(everyone, leaks, color="tab:purple")
    axes[2].set_yscale("log")
    axes[2].tick_params(axis="x", rotation=25, labelsize=8)
    axes[2].set(ylabel="max |logit change| at t <= T/2", title="causality probe (0 is causal; drawn at >= 1e-12)")
    return save(fig, root, "expert_choice_leak.png")


# Each plot and the claims whose runs it draws.
PLOTS = [(plot_alpha, {"alpha"}), (plot_softmax, {"softmax"}), (plot_maxvio_batch, {"lossfree", "alpha"}),
         (plot_computation_batch, {"computation_batch"}), (plot_bias_rate, {"bias_rate"}),
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


def verdict_table(res):
    """The README's short form: one row per part of every judged claim, its
    difference with the 95% interval, and its verdict before and after Holm.
    The whole evidence (arms, margins, the papers' own effects) is in
    docs/results.md."""
    rows = ["| claim (paper) | part | difference [95% interval] | seeds | verdict | after Holm |",
            "|---|---|---|---|---|---|"]
    for c in (c for c in res["claims"] if c["verdict"]):
        for i, p in enumerate(c["parts"]):
            what = f"{c['key']} ({c['source'].split(':')[0]})" if i == 0 else ""
            diff = (f"{fmt(p.get('diff'), '+.4f')} {p['unit']}".strip() + f" [{fmt(p.get('ci_low'), '+.4f')}, "
                    f"{fmt(p.get('ci_high'), '+.4f')}]" if "diff" in p else "exact")
            sup = p.get("superiority")
            verdict = p["verdict"] + (f"; superiority: {sup['verdict']}" if sup else "")
            rows.append(f"| {what} | {p['part']} | {diff} | {p['seeds']} | {verdict} | {p['verdict_holm']} |")
    return "\n".join(rows) + "\n"


def publish(root):
    """Copy results.json and the plots to results/, write results.md there
    and docs/results.md (the whole page) from results.json, and the verdict
    table into the README between its markers. Everything is rendered and
    checked before the first file is written."""
    dest, docs = HERE / "results", HERE / "docs"
    res, (page, table) = checked_results(root)
    readme = (HERE / "README.md").read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError("README.md has no results markers to write between")
    head, rest = readme.split(README_BEGIN, 1)
    readme = (head + README_BEGIN + "\n" + verdict_table(res) + "\n" + f"![{res['plots'][0]}](results/{res['plots'][0]})\n"
              + README_END + rest.split(README_END, 1)[1])
    docs_page = ("# Results: the papers' claims, measured\n\n" + table.replace("](", "](../results/") + "\n"
                 + "\n".join(f"![{p}](../results/{p})" for p in res["plots"]) + "\n")
    dest.mkdir(exist_ok=True)
    docs.mkdir(exist_ok=True)
    for name in ["results.json"] + res["plots"]:
        shutil.copy(root / name, dest / name)
    (dest / "results.md").write_text(page)
    (docs / "results.md").write_text(docs_page)
    (HERE / "README.md").write_text(readme)
    print(f"copied the results to {dest}/, wrote docs/results.md and the README's verdict table")


def pilot_plan(args, common):
    """Every claim on the pilot seeds (>= 1000, never used by a confirmatory
    run); two of them at the quick and smoke sizes."""
    seeds = PILOT_SEEDS if args.size == "default" else PILOT_SEEDS[:2]
    return Plan(args.size, common, keys=args.claims,
                seed_lists={c.key: seeds for c in claims(args.size)})


def confirmatory_plan(args, common, root, pilot):
    """Seeds 0..n-1 per claim, n from --seeds, else the pilot, else the
    claim's budget share; fixed in OUT/seeds.json by the first run into OUT.
    A later run into the same folder must ask for the same seeds: a
    confirmatory result is never extended after its numbers have been seen."""
    keys = [c.key for c in claims(args.size) if args.claims is None or c.key in args.claims]
    wanted = {c.key: args.seeds or planned_seeds(c, args.size, pilot) for c in claims(args.size) if c.key in keys}
    frozen = read_json(root / "seeds.json") or {}
    changed = {k: (frozen[k], n) for k, n in wanted.items() if k in frozen and frozen[k] != n}
    if changed:
        k, (was, now) = next(iter(changed.items()))
        raise ValueError(f"{root} holds a confirmatory run with {was} seeds for '{k}' (now {now}): a confirmatory "
                         f"run is never extended; use another --out (and --reuse {root} to copy finished runs)")
    if not args.seeds:
        wanted = fit_budget(args, common, wanted, {k for k in wanted if k not in frozen}, (pilot or {}).get("run_seconds"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.json").write_text(json.dumps({**frozen, **wanted}, indent=1))
    return Plan(args.size, common, keys=args.claims, seed_lists={k: range(n) for k, n in wanted.items()})


BUDGET_MINUTES = 90    # what the default confirmatory run may take on a 2-core machine


def fit_budget(args, common, wanted, free, measured):
    """If the plan's estimate (with the pilot's run times when known) is over
    BUDGET_MINUTES, take one seed at a time from the claim in `free` (not yet
    fixed) with the most, down to MIN_SEEDS. Done before any confirmatory
    run, from times alone: no result is looked at."""
    wanted = dict(wanted)
    while True:
        plan = Plan(args.size, common, keys=args.claims, seed_lists={k: range(n) for k, n in wanted.items()})
        cut = [k for k in free if wanted[k] > MIN_SEEDS]
        if plan.estimate_minutes(args.jobs, measured) <= BUDGET_MINUTES or not cut:
            return wanted
        wanted[max(cut, key=lambda k: wanted[k])] -= 1


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
                   help="only these claims' runs and verdicts, e.g. 'softmax' "
                        f"(keys: {', '.join(c.key for c in claims('default'))}; main: every strategy at its "
                        f"defaults and the exact causality check of token choice)")
    p.add_argument("--reuse", type=Path, metavar="DIR",
                   help="copy runs that finished with the same flags from DIR (another --out) instead of "
                        "training them again, e.g. to add seeds to one claim in a new folder")
    p.add_argument("--seeds", type=int, metavar="N", help="N seeds for every arm (default: per claim, fixed from "
                                                          "OUT/pilot.json, else the claim's budget share; quick 2; "
                                                          "smoke 1)")
    p.add_argument("--pilot", action="store_true",
                   help=f"train every arm on the pilot seeds {PILOT_SEEDS[0]}..{PILOT_SEEDS[-1]} and write "
                        f"OUT/pilot.json: each part's spread and the seeds per claim the confirmatory run "
                        f"(the same command without --pilot) will use")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="runs at a time, one thread each (default: the number of CPUs)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per run (torchrun, expert parallel; default: 1)")
    p.add_argument("--train-args", default="", metavar="'FLAGS'", help="extra train.py flags for every run, "
                                                                      "e.g. '--data mytext/' or '--device cuda'")
    p.add_argument("--publish", action="store_true", help="copy OUT's results to results/, docs/results.md and the README's verdict table, then stop")
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
    pilot = read_json(root / "pilot.json")
    plan = pilot_plan(args, common) if args.pilot else confirmatory_plan(args, common, root, pilot)
    measured = (pilot or {}).get("run_seconds")
    print(f"{'pilot' if args.pilot else 'confirmatory'} plan: {len(plan.runs)} runs, seeds per claim "
          + ", ".join(f"{k} {len(v)}" for k, v in plan.claim_seeds.items())
          + f"; estimated {plan.estimate_minutes(args.jobs, measured):.0f} min with {args.jobs} at a time "
          + ("(from the pilot's run times)" if measured and not args.pilot else
             "(from per-step times measured on 2 cores, 2 runs at a time)"), flush=True)
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
    if args.pilot:
        summary = pilot_summary(judged, plan, root)
        (root / "pilot.json").write_text(plumbing.finite_json(summary, indent=1))
        print(f"pilot: wrote {root / 'pilot.json'}; the confirmatory run (the same command without --pilot) will "
              f"use seeds per claim " + ", ".join(f"{k} {n}" for k, n in summary["seeds"].items()))
        return 0
    res = results_json(root, r, plan, judged, args, wall)
    res["pilot"] = pilot or {"note": "no pilot.json in the output folder: seeds per claim were the budget shares"}
    res["runs_trained"] = trained
    keys = {c.key for c in plan.claims}
    res["plots"] = [plot(root, r) for plot, needs in PLOTS if needs <= keys]
    (root / "results.json").write_text(plumbing.finite_json(res, indent=1))
    (root / "results.md").write_text(results_md(res))
    for c in judged:
        if c["verdict"]:
            print(f"{c['key']}: {c['verdict']} -- {c['claim']}")
    print(f"wall time {wall / 60:.1f} min; wrote {root / 'results.json'}, {root / 'results.md'} and "
          f"{len(res['plots'])} plots (python compare.py --publish copies them to results/, docs/results.md and the README)")
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
