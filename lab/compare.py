"""
lab/compare.py -- compare training recipes honestly: the papers' claims,
with numbers made here, the way the papers measured them, and any arms of
your own (your strategy against the others) by the same rules.

    python -m lab.compare --pilot      # the pilot: seeds 1000-1002, about 31 min on 2 CPU cores
    python -m lab.compare              # the confirmatory run: at most 90 min on 2 CPU cores
    python -m lab.compare --quick      # a few minutes: 2 seeds, short runs
    python -m lab.compare --smoke      # seconds: does everything run?
    python -m lab.compare --publish    # copy the results to results/, docs/results.md and the README
    python -m lab.compare --arms mine="--import mine.py --balancer mine" lossfree="--balancer lossfree" --seeds 5

Run it from the repository root: the lesson's modules (train.py,
balancers.py, ...) import from there, and train.py runs from there.

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
The rules are lab/stats.py, the claims lab/claims.py; --arms builds one
more claim from your arms (lab.claims.strategy_comparison) and this file
trains and judges it exactly as it does the papers'.

Read it top to bottom:
  1. the plan: which runs, on which seeds
  2. running the arms: train.py in parallel subprocesses, resumably
  3. reading a run, and the within-model shuffle test of expert choice
  4. judging the claims' parts
  5. results.json and results.md
  6. plots, one per paper figure
  7. main
"""

import argparse
import contextlib
import functools
import hashlib
import io
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
from lab.claims import ARMS_SEEDS, CB_BIG, CB_MID, MARGINS, SIZES, paper_claims, strategy_comparison
from lab.stats import MIN_SEEDS, PILOT_SEEDS, apply_holm, combine, confirmatory_seeds, interval, powered_seeds, \
    resolve_note, sd_upper

# The repository root: train.py, README.md, results/ and docs/ are there.
ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------
# 1. The plan.

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


def settings_key(flags, common):
    """What makes two runs the same run: the strategy's resolved settings and
    every other train.py flag. Two labels with equal keys share runs."""
    args = train.parse_args(common + flags)
    resolved = plumbing.strategy_settings(args)
    rest = {k: v for k, v in vars(args).items() if k not in resolved and k not in ("out", "seed")}
    return json.dumps({"strategy": resolved, **rest}, sort_keys=True, default=str)


class Plan:
    """Which runs to train. claim_seeds: {claim key: [seed, ...]}, the seeds
    every arm of that claim has (all its rows, parts and plots use exactly
    these); an arm gets the union of its claims' seeds. runs: {folder:
    (flags, seed)}; labels: {label: folder stem}; seeds: {label: [seed, ...]};
    token_choice: {label: whether its strategy is token choice}.
    `claims` (default: the papers', lab.claims.paper_claims) and `keys`
    choose the claims; `only_seeds` (N) gives every claim seeds 0..N-1;
    `seed_lists` ({key: [seeds]}) sets them per claim (the pilot, or the
    frozen confirmatory plan)."""

    def __init__(self, size, common, only_seeds=None, keys=None, seed_lists=None, claims=None):
        self.size, self.common = size, common
        self.claims = [c for c in (paper_claims(size) if claims is None else claims) if keys is None or c.key in keys]
        self.arms = {label: flags for c in self.claims for label, flags in c.arms.items()}
        self.claim_seeds = {}
        for c in self.claims:
            n = planned_seeds(c, size) if only_seeds is None else only_seeds
            self.claim_seeds[c.key] = list(seed_lists[c.key]) if seed_lists else list(range(n))
        self.seeds = {}
        for c in self.claims:
            for label in c.arms:
                self.seeds[label] = sorted(set(self.seeds.get(label, [])) | set(self.claim_seeds[c.key]))
        self.stem, self.runs, self.token_choice = {}, {}, {}
        for label, seeds in self.seeds.items():
            flags = self.arms[label]
            strategy = train.parse_args(common + flags).balancer
            self.token_choice[label] = BALANCERS[strategy].token_choice
            digest = hashlib.sha1(settings_key(flags, common).encode()).hexdigest()[:8]
            self.stem[label] = f"{strategy}-{digest}"
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


# ----------------------------------------------------------------------------
# 2. Running the arms.

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
            # train.py by its path, so that its own folder (the repository
            # root) heads its sys.path wherever this runs from; the working
            # folder stays the caller's, where --out, --data and --import
            # paths were given, as for the runs made in this process.
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            code = subprocess.call(launcher + [str(ROOT / "train.py"), *flags], stdout=log, stderr=log, env=env)
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
    (run_dir / "extra.json").write_text(json.dumps(checkpoint_evals(run_dir)))
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

def checkpoint_evals(run_dir):
    """The measurements that need a run's model, made once before its
    checkpoint is deleted. Expert choice (any strategy that is not token
    choice): the within-model shuffle test below. Token choice: its val loss
    on the windows the causal evaluation of expert choice covers (the first
    train.CAUSAL_BATCHES validation batches). Token choice is exactly
    causal, so that is its causal loss there: what an expert-choice arm's
    causal loss is paired with, window for window."""
    model, ckpt = plumbing.load_model(run_dir)
    args = argparse.Namespace(**ckpt["args"])
    proc = plumbing.Proc()
    corpus = load_corpus(args.data, seq_len=args.seq_len, log=lambda *a: None)
    batches = val_batches(corpus, args.seq_len, args.batch_size // args.grad_accum, args.val_seqs)
    within_byte = {"specialization_within_byte": byte_controlled_specialization(model, batches, proc.device)}
    if BALANCERS[model.cfg.balancer].token_choice:
        windows = batches[:train.CAUSAL_BATCHES]
        return {"val_loss_causal_windows": train.evaluate(model, corpus, windows, proc, causal_batches=0)["val_loss"],
                **within_byte}
    return {**shuffled_routing_eval(model, corpus, batches, proc), **within_byte}


@torch.no_grad()
def byte_controlled_specialization(model, batches, device, seed=0):
    """Domain specialisation with the byte held fixed. The domains use
    different bytes (math is mostly digits), so an expert that takes digits
    looks like a math expert: train.specialization_score cannot tell domain
    from byte, and Qiu et al. 2025 separate the two. Here, for each input
    byte seen in two domains or more, the same score (total variation of
    each domain's expert distribution from their mean) on the tokens of
    that byte alone, averaged over bytes weighted by their tokens and over
    layers; minus the same figure with the domain labels shuffled among the
    tokens of each byte (seeded), which is what counting noise alone gives
    at these counts. 0: given the byte, the domain does not move the expert."""
    model.eval()
    cfg = model.cfg
    cells, tokens, domains = [], [], []
    for x, _, dom in batches:
        out = model(x.to(device))
        tokens.append(x.reshape(-1))
        domains.append(dom.repeat_interleave(x.shape[1]))
        cells.append([(r.token_idx.cpu() + sum(t.numel() for t in tokens[:-1]), r.expert_idx.cpu())
                      for r in out.routings])
    byte, domain = torch.cat(tokens).long(), torch.cat(domains).long()
    layers = [(torch.cat([c[layer][0] for c in cells]), torch.cat([c[layer][1] for c in cells]))
              for layer in range(cfg.n_layers)]
    return within_byte_specialization(byte, domain, layers, cfg.n_experts, seed)


def within_byte_specialization(byte, domain, layers, n_experts, seed=0):
    """byte_controlled_specialization from the tokens' bytes and domains and,
    per layer, the (token, expert) assignments: the observed score minus the
    score with domain labels shuffled among each byte's tokens."""
    D = int(domain.max()) + 1
    shuffled = torch.empty_like(domain)
    g = torch.Generator().manual_seed(seed)
    # tokens grouped by byte, in a random order within each byte: each takes the label of another token of its byte
    mixed = torch.argsort(byte.double() + 0.5 * torch.rand(byte.shape, generator=g, dtype=torch.float64))
    shuffled[torch.argsort(byte, stable=True)] = domain[mixed]
    score = []
    for labels in (domain, shuffled):
        per_layer = []
        for tok, exp in layers:
            cell = (byte[tok] * D + labels[tok]) * n_experts + exp
            counts = torch.bincount(cell, minlength=256 * D * n_experts).view(256, D, n_experts).double()
            total = counts.sum(-1)
            present = total > 0
            p = counts / total.clamp(min=1)[..., None]
            mean = (p * present[..., None]).sum(1) / present.sum(1).clamp(min=1)[..., None]
            tv = (0.5 * (p - mean[:, None]).abs().sum(-1) * present).sum(1) / present.sum(1).clamp(min=1)
            weight = total.sum(1) * (present.sum(1) >= 2)            # bytes seen in two domains or more
            per_layer.append(((tv * weight).sum() / weight.sum().clamp(min=1)).item())
        score.append(sum(per_layer) / len(per_layer))
    return score[0] - score[1]


def shuffled_routing_eval(model, corpus, batches, proc):
    """Wang et al. 2024's control for expert choice, within one trained model:
    its validation loss with routing groups made of whole sequences (as
    trained with small chunks) and with the tokens shuffled across groups,
    so a group holds almost nothing of any one sequence's future. A model
    that learnt to read the future from its routing loses when shuffled.
    The evaluation draws a fresh permutation per batch, never one its
    training used (balancers.fresh_permutation), so a model trained shuffled
    is not evaluated on its own training regime."""
    out = {}
    for shuffle in (False, True):
        for layer in model.moe_layers():
            layer.balancer.cfg.route_shuffle = shuffle
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
    """The figures a claim may use, for one run. val_loss_as_generated is the
    causal loss on the causal evaluation's windows, for every strategy."""
    s, log, extra = read_json(run_dir / "summary.json"), load_log(run_dir), read_json(run_dir / "extra.json") or {}
    vio = [r["maxvio_batch"] for r in log]
    q = max(1, len(vio) // 4)
    cb = dict(zip(s["maxvio_computation_batch"]["sizes"], s["maxvio_computation_batch"]["maxvio"]))
    at = lambda size: max(S for S in cb if S <= size) if min(cb) <= size else min(cb)   # the largest S up to size
    mid, big = at(CB_MID), at(CB_BIG)
    c = s["config"]
    floor = lambda S: maxvio_noise_floor(S * c["seq_len"], c["n_experts"], c["top_k"])
    causal = {"val_loss_causal": s["val_loss_causal"],
              "val_loss_forced_same_windows": s["val_loss_forced_same_windows"],
              "causal_gap": s["val_loss_causal"] - s["val_loss_forced_same_windows"]} if "val_loss_causal" in s else {}
    return {"val_loss": s["val_loss"], "val_ppl": s["val_ppl"], **causal,
            "val_loss_as_generated": s.get("val_loss_causal", extra.get("val_loss_causal_windows")),
            "cb_mid": cb[mid], "cb_big": cb[big], "cb_all": cb[max(cb)], "cb_fall": cb[max(cb)] - cb[mid],
            "cb_excess_fall": (cb[big] - floor(big)) - (cb[mid] - floor(mid)),
            **{f"loss_{d}": s["val_loss_by_domain"][d] for d in s["domains"]},
            "maxvio_global": s["maxvio_global"], "maxvio_batch": s["maxvio_batch"],
            "maxvio_early": sum(vio[:q]) / q, "maxvio_late": sum(vio[-q:]) / q,
            "specialization": s["specialization"], "causal_leak": s["causal_leak"],
            "specialization_within_byte": extra.get("specialization_within_byte"),
            "tokens_per_second": s["tokens_per_second"], "bias_reversals": reversal_rate(log),
            **({"shuffle_cost": extra["val_loss_shuffled"] - extra["val_loss_grouped"]} if "val_loss_shuffled" in extra
               else {})}


@functools.lru_cache(maxsize=None)
def maxvio_noise_floor(n_tokens, n_experts, top_k, draws=200):
    """MaxVio of a perfectly random balanced router: every token takes k
    distinct experts uniformly at random. Counting noise alone makes the
    busiest expert exceed the mean, so MaxVio over n_tokens never reads 0;
    a measured MaxVio_batch near this floor is as balanced as chance allows.
    Mean over `draws` batches (fewer, at least 20, for a large batch) drawn
    a few at a time so that they fit in memory; seeded: the same figure
    every time."""
    g = torch.Generator().manual_seed(0)
    draws = min(draws, max(20, 2 ** 27 // (n_tokens * n_experts)))   # a large batch's floor varies little
    at_once = max(1, min(draws, 2 ** 24 // (n_tokens * n_experts)))
    vio = []
    for start in range(0, draws, at_once):
        n = min(at_once, draws - start)
        picks = torch.rand(n, n_tokens, n_experts, generator=g).topk(top_k, dim=-1).indices.reshape(n, -1)
        load = torch.zeros(n, n_experts).scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float))
        vio.append(train.max_violation(load))
    return torch.cat(vio).mean().item()


# ----------------------------------------------------------------------------
# 4. Judging the claims' parts.

class Results:
    """metrics of every run, by label and seed."""

    def __init__(self, root, plan):
        self.plan = plan
        self.rows = {name: metrics(root / "runs" / name) for name in plan.runs}

    def values(self, label, column, seeds=None):
        """One figure per seed, in the order of `seeds` (default: all the arm's)."""
        out = []
        for s in (self.plan.seeds[label] if seeds is None else seeds):
            value = self.rows[self.plan.folder(label, s)].get(column)
            if value is None:
                raise ValueError(f"run {self.plan.folder(label, s)} has no {column}: it finished before this "
                                 f"figure was recorded; delete that run folder to train it again")
            out.append(value)
        return out

    def token_choice(self, label):
        return self.plan.token_choice[label]


def part_seeds(plan, part):
    """The seeds a part is judged on: every seed all of its arms have. An arm
    shared by two claims has the union of their seeds, so no part reads a
    subset of the runs its arms have."""
    return sorted(set.intersection(*(set(plan.seeds[lbl]) for lbl in part.arms())))


def judge(r):
    """Every claim of the plan: each part judged on every seed its arms share
    (part_seeds), the claim's verdict from its parts, and Holm over every
    test of every claim as one family."""
    out = []
    for c in r.plan.claims:
        judged = [p.judge(r.values, part_seeds(r.plan, p), r.token_choice) for p in c.parts]
        # An exact check has no noise: it is listed as a property of the code
        # (a failure is a bug), not counted among the claim's verdicts.
        parts = [p for p in judged if "diff" in p]
        seeds = sorted(set().union(*(part_seeds(r.plan, p) for p in c.parts))) if c.parts else \
            r.plan.claim_seeds[c.key]
        out.append({"key": c.key, "claim": c.text, "source": c.source, "scale": c.scale, "parts": parts,
                    "properties": [p for p in judged if "diff" not in p], "arm_labels": list(c.arms),
                    "verdict": combine([p["verdict"] for p in parts]) if parts else None, "seeds": seeds})
    apply_holm(out)
    return out


def pilot_summary(judged, plan, root):
    """What the pilot measured and what it fixes: each part's paired mean and
    spread, the seeds it asks for (stats.powered_seeds: 80% power at the
    paper's effect, or at the pilot's mean where the paper gives none, with
    the spread's upper 95% bound), and each claim's confirmatory seed count
    (stats.confirmatory_seeds, within the claim's budget share). Also the
    runs' own times, which size the confirmatory plan."""
    budget = {c.key: c.seeds for c in plan.claims}
    spreads, seeds = {}, {}
    for c in judged:
        for p in c["parts"]:
            if "diff" in p:
                at = "the paper's effect" if p.get("effect") is not None else "a no-worse margin (effect 0)" \
                    if "superiority" in p else "the pilot's mean (no paper figure)"
                spreads[f"{c['key']}: {p['part']}"] = {
                    "diff": p["diff"], "sd": p["sd"], "sd_upper": sd_upper(p["sd"], p["seeds"]) if p["sd"] else None,
                    "powered_at": at, "seeds_needed": powered_seeds(p)}
        seeds[c["key"]] = confirmatory_seeds(c["parts"], budget[c["key"]])
    elapsed = {}
    for name in plan.runs:
        rec = read_json(root / "runs" / name / "run.json") or {}
        elapsed.setdefault(name.rsplit("-s", 1)[0], []).append(rec.get("elapsed_s", 0.0))
    return {"seeds_used": PILOT_SEEDS, "parts": spreads, "seeds": seeds,
            "run_seconds": {stem: sum(v) / len(v) for stem, v in elapsed.items()}}


# ----------------------------------------------------------------------------
# 5. results.json and results.md.

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
        if plan.token_choice[lbl]:
            floors[lbl] = maxvio_noise_floor(a.batch_size * a.seq_len, a.n_experts, a.top_k)
    common = train.parse_args(plan.common)
    return {"command": " ".join(["python -m lab.compare"] + [shlex.quote(a) for a in args.argv]),
            "kind": "arms" if args.arms else "claims",
            "size": args.size, "steps": common.steps, "wall_time_s": wall,
            "val_windows_per_domain": common.val_seqs,
            "margins_nats": {k: {"margin": m, "source": why} for k, (m, why) in MARGINS.items()},
            "maxvio_batch_noise_floor": floors,
            "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
                        "jobs": args.jobs},
            "claims": judged, "claim_seeds": plan.claim_seeds,
            "arms": {lbl: {"flags": plan.arms[lbl], "seeds": plan.seeds[lbl]} for lbl in plan.seeds},
            "runs": runs}


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
        rows = [by_run[lbl, s] for s in c["seeds"] if (lbl, s) in by_run]
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


def parts_table(c, paper=True):
    """One row per part: the paired difference, its 95% interval, the seeds,
    the verdict (with what more seeds would do when unresolved), after Holm,
    and (paper) what the paper reports for the same comparison."""
    lines = ["| part | difference | 95% interval | seeds | verdict | Holm |" + " paper |" * paper,
             "|---|---|---|---|---|---|" + "---|" * paper]
    for p in c["parts"]:
        diff = f"{fmt(p.get('diff'), '+.4f')} {p['unit']}".strip() if "diff" in p else "exact"
        ci = f"[{fmt(p.get('ci_low'), '+.4f')}, {fmt(p.get('ci_high'), '+.4f')}]" if "diff" in p else "-"
        more = resolve_note(p) if p["verdict"] == "unresolved" else ""
        sup = p.get("superiority")
        sup_note = f"; superiority: {sup['verdict']} (Holm: {sup['verdict_holm']})" if sup else ""
        lines.append(f"| {p['part']} | {diff} | {ci} | {p['seeds']} | {p['verdict']}{more}{sup_note} | "
                     f"{p['verdict_holm']} |" + f" {p.get('paper', '-')} |" * paper)
    return lines


def properties_table(c):
    """Exact checks: a property of the code on every run of its arms."""
    lines = ["| property (exact, on every run) | runs | |", "|---|---|---|"]
    return lines + [f"| {p['part']} | {p['seeds']} | {'holds' if p['verdict'] == 'holds' else 'FAILS: a bug'} |"
                    for p in c.get("properties", [])]


def claim_section(res, c, i):
    """A claim's heading, whether this scale can test it, its arms' table,
    its parts' table and its exact properties."""
    n = len(c["seeds"])
    verdict = f"**{c['verdict']}** (Holm: {c['verdict_holm']})" if c["verdict"] else "properties only"
    return [f"{i}. *{c['claim']}* ({c['source']}; {n} seed{'s' * (n > 1)}): {verdict}", ""] + \
        ([f"   Can this scale test it? {c['scale']}.", ""] if c.get("scale") else []) + \
        ["   " + line for line in claim_table(res, c)] + [""] + \
        (["   " + line for line in parts_table(c, paper=res.get("kind") != "arms")] + [""] if c["parts"] else []) + \
        (["   " + line for line in properties_table(c)] + [""] if c.get("properties") else [])


def markdown(res):
    """results.md (and the README's Results section) from results.json alone."""
    # A second invocation only trains what is missing: say so, or its wall
    # time would read as the time the whole comparison takes.
    trained = res.get("runs_trained", len(res["runs"]))
    earlier = f" (it trained {trained} runs; {len(res['runs']) - trained} had finished earlier)" \
        if trained < len(res["runs"]) else ""
    lines = [f"Produced by `{res['command']}` in {res['wall_time_s'] / 60:.1f} min{earlier} "
             f"({res['machine']['cpus']} CPUs, "
             f"{res['machine']['jobs']} runs at a time, torch {res['machine']['torch']}); "
             f"{res['steps']} steps per run, "
             f"validation on up to {res['val_windows_per_domain']} windows per domain. Each part reads every seed "
             f"its arms share (an arm in two claims has the seeds of both); rows: mean ± std over the arm's seeds "
             f"in the claim. The MaxVio_batch floor is "
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
    for i, c in enumerate([c for c in res["claims"] if c["verdict"] or c.get("properties")], 1):
        lines += claim_section(res, c, i)
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
    sweep (softmax gate here), with loss-free off the trade-off curve."""
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
    zero = next(lbl for lbl in alpha_labels if lbl.endswith("alpha=0"))
    ax.plot(*curve(root, r, zero, alpha_seeds), label=zero)
    a = train.parse_args(r.plan.common + r.plan.arms[labels[0]])
    ax.axhline(maxvio_noise_floor(a.batch_size * a.seq_len, a.n_experts, a.top_k), color="grey", ls="--",
               label="noise floor (random balanced router)")
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers and seeds)",
           title="Load imbalance of each training batch")
    ax.legend()
    return save(fig, root, "maxvio_batch.png")


def plot_computation_batch(root, r):
    """Wang et al. 2024, Fig. 5: MaxVio over computation batches of S
    validation sequences (drawn in a random order) against S, for the
    claim's two models, and a random balanced router's at each S."""
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
    a = train.parse_args(r.plan.common + r.plan.arms[labels[0]])
    sizes = curves[0]["sizes"]
    ax.plot(sizes, [maxvio_noise_floor(S * a.seq_len, a.n_experts, a.top_k) for S in sizes], "--", color="grey",
            label="noise floor (random balanced router)")
    ax.axvline(CB_MID, color="grey", ls=":", label=f"S = {CB_MID} (the training batch)")
    ax.axvline(CB_BIG, color="grey", ls="-.", label=f"S = {CB_BIG}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
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
    for ax, lbl in zip(axes[:2], (labels[0], labels[1])):
        s = read_json(root / "runs" / r.plan.folder(lbl, seeds[0]) / "summary.json")
        im = ax.imshow(s["expert_freq"][0], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(s["domains"])), s["domains"])
        ax.set(xlabel="expert", title=f"{lbl}\nlayer 0")
        fig.colorbar(im, ax=ax, shrink=0.8)
    x = list(range(len(labels)))
    ticks = [lbl.split(", ")[-1].replace("balance ", "") for lbl in labels[:2]] + ["shuffle"]
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
def plot_since_2024(root, r):
    """The methods since loss-free balancing: MaxVio_batch over training
    (left: how fast each balances) and each arm's val loss against its
    MaxVio_global (right), mean over the claim's seeds."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    labels, seeds = claim_arms(r, "since_2024")
    for lbl in labels:
        if lbl != "expert_choice":          # balanced by construction in training: MaxVio_batch 0
            left.plot(*curve(root, r, lbl, seeds), label=lbl, lw=1)
        right.plot(mean(r.values(lbl, "maxvio_global", seeds)), mean(r.values(lbl, "val_loss", seeds)), "o")
        right.annotate(lbl, (mean(r.values(lbl, "maxvio_global", seeds)), mean(r.values(lbl, "val_loss", seeds))),
                       textcoords="offset points", xytext=(5, 4), fontsize=7)
    a = train.parse_args(r.plan.common + r.plan.arms[labels[0]])
    left.axhline(maxvio_noise_floor(a.batch_size * a.seq_len, a.n_experts, a.top_k), color="grey", ls="--",
                 label="noise floor (random balanced router)")
    left.set(xlabel="step", ylabel="MaxVio_batch (mean over layers and seeds)", yscale="log",
             title=f"How fast each balances ({len(seeds)} seeds)")
    left.legend(fontsize=7)
    right.set(xlabel="MaxVio_global", ylabel="validation loss (nats/byte, teacher-forced)",
              title="Balance and loss at the end")
    return save(fig, root, "since_2024.png")


PLOTS = [(plot_alpha, {"alpha"}), (plot_softmax, {"softmax"}), (plot_maxvio_batch, {"lossfree", "alpha"}),
         (plot_computation_batch, {"computation_batch"}), (plot_bias_rate, {"bias_rate"}),
         (plot_global, {"global"}), (plot_expert_choice, {"expert_choice", "main"}),
         (plot_since_2024, {"since_2024"})]

# ----------------------------------------------------------------------------
# 7. main.

# The README's markers around the verdict table that --publish rewrites.
README_BEGIN, README_END = "<!-- compare.py results: begin -->", "<!-- compare.py results: end -->"


def results_md(res):
    title = "Your arms, compared on paired seeds" if res.get("kind") == "arms" else "The papers' claims, measured here"
    return (f"# {title}\n\n" + markdown(res) + "\n" +
            "\n".join(f"![{p}]({p})" for p in res["plots"]) + "\n")


def checked_results(root):
    """OUT's results.json, refused with one line unless it is whole: it parses,
    its tables render, and every plot it lists is a file in OUT. Checked
    before anything is copied, so a damaged run never replaces a good one."""
    path = root / "results.json"
    if not path.is_file():
        raise ValueError(f"no {path} to publish: run python -m lab.compare first")
    try:
        res = json.loads(path.read_bytes())
        plots = res["plots"]
        pages = results_md(res), markdown(res)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path} is damaged or incomplete ({type(e).__name__}: {plumbing.first_line(e)[:80]}); "
                         f"run python -m lab.compare again to rewrite it") from None
    if res.get("kind") == "arms":
        raise ValueError(f"{path} compares arms of your own (--arms), not the papers' claims: --publish copies "
                         f"only the claims' results")
    if not plots or not all(isinstance(p, str) and p and Path(p).name == p for p in plots):
        raise ValueError(f"{path} is damaged or incomplete (it lists no plots); "
                         f"run python -m lab.compare again to rewrite it")
    missing = [p for p in plots if not (root / p).is_file()]
    if missing:
        raise ValueError(f"{path} lists plots that are not in {root}: {', '.join(missing)}; "
                         f"run python -m lab.compare again to redraw them")
    return res, pages
def verdict_table(res):
    """The README's short form: one row per part of every judged claim, its
    difference with the 95% interval, and its verdict before and after Holm.
    The whole evidence (arms, margins, the papers' own effects) is in
    docs/results.md."""
    rows = ["| claim (paper) | part | difference [95% interval] | seeds | verdict | after Holm |",
            "|---|---|---|---|---|---|"]
    for c in (c for c in res["claims"] if c["verdict"] or c.get("properties")):
        for i, p in enumerate(c["parts"] + c.get("properties", [])):
            what = f"{c['key']} ({c['source'].split(':')[0]})" if i == 0 else ""
            if "diff" not in p:
                state = "property holds" if p["verdict"] == "holds" else "property FAILS (a bug)"
                rows.append(f"| {what} | {p['part']} | exact, every run | {p['seeds']} runs | {state} | - |")
                continue
            diff = (f"{fmt(p.get('diff'), '+.4f')} {p['unit']}".strip() + f" [{fmt(p.get('ci_low'), '+.4f')}, "
                    f"{fmt(p.get('ci_high'), '+.4f')}]")
            sup = p.get("superiority")
            verdict = p["verdict"] + (f"; superiority: {sup['verdict']}" if sup else "")
            rows.append(f"| {what} | {p['part']} | {diff} | {p['seeds']} | {verdict} | {p['verdict_holm']} |")
    return "\n".join(rows) + "\n"


def publish(root):
    """Copy results.json and the plots to results/, write results.md there
    and docs/results.md (the whole page) from results.json, and the verdict
    table into the README between its markers. Everything is rendered and
    checked before the first file is written."""
    dest, docs = ROOT / "results", ROOT / "docs"
    res, (page, table) = checked_results(root)
    readme = (ROOT / "README.md").read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError("README.md has no results markers to write between")
    head, rest = readme.split(README_BEGIN, 1)
    readme = (head + README_BEGIN + "\n" + verdict_table(res) + "\n"
              + f"![{res['plots'][0]}](results/{res['plots'][0]})\n" + README_END + rest.split(README_END, 1)[1])
    docs_page = ("# Results: the papers' claims, measured\n\n" + table.replace("](", "](../results/") + "\n"
                 + "\n".join(f"![{p}](../results/{p})" for p in res["plots"]) + "\n")
    dest.mkdir(exist_ok=True)
    docs.mkdir(exist_ok=True)
    for name in ["results.json"] + res["plots"]:
        shutil.copy(root / name, dest / name)
    (dest / "results.md").write_text(page)
    (docs / "results.md").write_text(docs_page)
    (ROOT / "README.md").write_text(readme)
    print(f"copied the results to {dest}/, wrote docs/results.md and the README's verdict table")



def publish_to(root, dest):
    """Copy results.json, the plots and results.md to `dest` alone: a run of
    some claims kept beside the main results, which it leaves as they are."""
    res, (page, _) = checked_results(root)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["results.json"] + res["plots"]:
        shutil.copy(root / name, dest / name)
    (dest / "results.md").write_text(page)
    print(f"copied the results to {dest}/")


def chosen_claims(args, common):
    """What this invocation judges: your arms as one claim (--arms), or the
    papers' claims (all, or those --claims names)."""
    if args.arms:
        token_choice = {lbl: BALANCERS[train.parse_args(common + flags).balancer].token_choice
                        for lbl, flags in args.arms.items()}
        return [strategy_comparison(args.arms, token_choice)]
    return [c for c in paper_claims(args.size) if args.claims is None or c.key in args.claims]


def pilot_plan(args, common):
    """Every claim on the pilot seeds (>= 1000, never used by a confirmatory
    run); two of them at the quick and smoke sizes."""
    seeds = PILOT_SEEDS if args.size == "default" else PILOT_SEEDS[:2]
    chosen = chosen_claims(args, common)
    return Plan(args.size, common, claims=chosen, seed_lists={c.key: seeds for c in chosen})


def confirmatory_plan(args, common, root, pilot):
    """Seeds 0..n-1 per claim, n from --seeds, else the pilot, else the
    claim's budget share; fixed in OUT/seeds.json by the first run into OUT.
    A later run into the same folder must ask for the same seeds: a
    confirmatory result is never extended after its numbers have been seen."""
    chosen = chosen_claims(args, common)
    wanted = {c.key: args.seeds or planned_seeds(c, args.size, pilot) for c in chosen}
    frozen = read_json(root / "seeds.json") or {}
    changed = {k: (frozen[k], n) for k, n in wanted.items() if k in frozen and frozen[k] != n}
    if changed:
        k, (was, now) = next(iter(changed.items()))
        raise ValueError(f"{root} holds a confirmatory run with {was} seeds for '{k}' (now {now}): a confirmatory "
                         f"run is never extended; use another --out (and --reuse {root} to copy finished runs)")
    if not args.seeds:
        wanted = fit_budget(args, common, wanted, {k for k in wanted if k not in frozen},
                            (pilot or {}).get("run_seconds"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.json").write_text(json.dumps({**frozen, **wanted}, indent=1))
    return Plan(args.size, common, claims=chosen, seed_lists={k: range(n) for k, n in wanted.items()})


BUDGET_MINUTES = 90    # what the default confirmatory run may take on a 2-core machine


def fit_budget(args, common, wanted, free, measured):
    """If the plan's estimate (with the pilot's run times when known) is over
    BUDGET_MINUTES, take one seed at a time from the claim in `free` (not yet
    fixed) with the most, down to MIN_SEEDS. Done before any confirmatory
    run, from times alone: no result is looked at."""
    wanted, chosen = dict(wanted), chosen_claims(args, common)
    while True:
        plan = Plan(args.size, common, claims=chosen, seed_lists={k: range(n) for k, n in wanted.items()})
        cut = [k for k in free if wanted[k] > MIN_SEEDS]
        if plan.estimate_minutes(args.jobs, measured) <= BUDGET_MINUTES or not cut:
            return wanted
        wanted[max(cut, key=lambda k: wanted[k])] -= 1


# The flags the comparison sets on every run itself.
RUNNER_FLAGS = ("--seed", "--out", "--resume", "--overwrite", "--stop-at")


def arm(text):
    """One --arms value: LABEL="train.py flags", or a bare strategy NAME,
    short for NAME="--balancer NAME"."""
    label, eq, rest = text.partition("=")
    label = label.strip()
    if not label:
        raise argparse.ArgumentTypeError(f"{text!r}: an arm is LABEL=\"FLAGS\", e.g. lossfree=\"--balancer lossfree\"")
    try:
        flags = shlex.split(rest) if eq else ["--balancer", label]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"arm {label!r}: {e}") from None
    taken = sorted({f.split("=")[0] for f in flags} & set(RUNNER_FLAGS))
    if taken:
        raise argparse.ArgumentTypeError(f"arm {label!r}: {', '.join(taken)} is set by the comparison for every "
                                         f"run; leave it out")
    return label, flags


def check_arm(label, flags, common, nproc):
    """An arm's flags, checked as train.py will check them, before anything
    is trained; a mistake is one line naming the arm."""
    said = io.StringIO()
    try:
        # train.py's parser prints its own one-line error and exits: keep the
        # line, to say which arm it is about.
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            args = train.parse_args(common + flags)
        plumbing.check_args(args, nproc)
    except SystemExit:
        why = said.getvalue().strip().splitlines() or ["not train.py flags"]
        raise ValueError(f"--arms {label}: {why[-1].split('error: ', 1)[-1]}") from None
    except ValueError as e:
        raise ValueError(f"--arms {label}: {plumbing.first_line(e)}") from None


def parse_args(argv=None):
    p = plumbing.OneLineParser(
        description="Train the arms of every paper claim (same data, model and seeds; each claim's arms differ "
                    "only in what the paper varied), or your own --arms, then write results.json, results.md "
                    "(tables and a three-way verdict per claim) and, for the claims, the plots. Finished runs are "
                    "kept: run the same command again to resume or redraw.")
    p.prog = "python -m lab.compare"   # what --help and errors call it: it runs as a module
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: 2 seeds, 150 steps")
    size.add_argument("--smoke", action="store_true", help="seconds: 1 seed, 3 steps, a toy model (tests)")
    size.add_argument("--preset", choices=list(train.PRESETS),
                      help="with --arms: every run takes this train.py preset's sizes and schedule instead of the "
                           "claims' (e.g. tiny: seconds per run)")
    p.add_argument("--arms", nargs="+", type=arm, metavar='LABEL="FLAGS"',
                   help="compare these arms instead of the papers' claims: each LABEL=\"train.py flags\" (a bare "
                        "NAME is NAME=\"--balancer NAME\"), e.g. mine=\"--import mine.py --balancer mine\" "
                        "lossfree=\"--balancer lossfree\". Every arm trains on the same seeds; each arm after the "
                        "first is paired with the first (B - A) on val loss, MaxVio_global and specialisation")
    p.add_argument("--out", default="compare_out", metavar="DIR",
                   help="results and runs/ go here (default: compare_out)")
    p.add_argument("--claims", type=lambda text: text.split(","), metavar="KEY,...",
                   help="only these claims' runs and verdicts, e.g. 'softmax' "
                        f"(keys: {', '.join(c.key for c in paper_claims('default'))}; main: every strategy at its "
                        f"defaults and the exact causality check of token choice)")
    p.add_argument("--reuse", type=Path, metavar="DIR",
                   help="copy runs that finished with the same flags from DIR (another --out) instead of "
                        "training them again, e.g. to add seeds to one claim in a new folder")
    p.add_argument("--seeds", type=int, metavar="N", help="N seeds for every arm (default: per claim, fixed from "
                                                          "OUT/pilot.json, else the claim's budget share, "
                                                          f"{ARMS_SEEDS} for --arms; quick 2; smoke 1)")
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
    p.add_argument("--publish", action="store_true",
                   help="copy OUT's results to results/, docs/results.md and the README's verdict table, then stop")
    p.add_argument("--publish-to", metavar="DIR",
                   help="copy OUT's results.json, results.md and plots to DIR only (e.g. results/since_2024 for a "
                        "run of some --claims beside the main results), then stop")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.size = "quick" if args.quick else "smoke" if args.smoke else "default"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder: choose another --out")
    if args.reuse is not None and not (args.reuse / "runs").is_dir():
        raise ValueError(f"--reuse {args.reuse}: no runs/ folder there to copy finished runs from")
    unknown = set(args.claims or []) - {c.key for c in paper_claims("default")}
    if unknown:
        raise ValueError(f"--claims: no claim {', '.join(sorted(unknown))}; see --help for the keys")
    for flag in ("seeds", "jobs", "nproc"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1 (got {value})")
    if args.arms is not None:
        labels = [label for label, _ in args.arms]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"--arms: the label {twice[0]!r} names two arms; give each arm its own label")
        if len(labels) < 2:
            raise ValueError("--arms: give at least two arms to compare, e.g. mine=\"--balancer aux\" "
                             "lossfree=\"--balancer lossfree\"")
        if args.claims is not None:
            raise ValueError("--arms and --claims: choose one (your arms, or the papers' claims)")
        args.arms = dict(args.arms)
    elif args.preset:
        raise ValueError("--preset: only with --arms (the papers' claims fix their own sizes: --quick, --smoke)")
    return args


def common_flags(args):
    """The train.py flags every run shares: the claims' size, or with
    --preset that train.py preset; every run logs each step and evaluates
    once, at the end. Then --train-args."""
    if args.preset:
        base = ["--preset", args.preset, "--eval-every", "0", "--log-every", "1"]
    else:
        size = SIZES[args.size]
        base = size["model"] + ["--batch-size", str(size["batch"]), "--steps", str(size["steps"]),
                                "--warmup", str(size["warmup"]), "--eval-every", "0", "--log-every", "1",
                                "--val-seqs", str(size["val_seqs"]), "--ckpt-every", str(max(1, size["steps"] // 4))]
    return base + shlex.split(args.train_args)


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.out)
    if args.publish:
        publish(root)
        return 0
    if args.publish_to:
        publish_to(root, Path(args.publish_to))
        return 0
    common = common_flags(args)
    plumbing.check_args(train.parse_args(common), args.nproc)
    for label, flags in (args.arms or {}).items():
        check_arm(label, flags, common, args.nproc)
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
    if args.arms:
        first = next(iter(args.arms))
        print(f"\nEvery arm against the first, {first}: each difference is B - {first} within seed, mean and 95% "
              f"t-interval; holds: B is better on that measure, contradicted: worse, unresolved: the seeds cannot "
              f"tell. Holm: after Holm-Bonferroni over every row.\n")
        print("\n".join(claim_section(res, judged[0], 1)))
    else:
        for c in judged:
            if c["verdict"]:
                print(f"{c['key']}: {c['verdict']} -- {c['claim']}")
            for p in c["properties"]:
                print(f"{c['key']}: property {'holds' if p['verdict'] == 'holds' else 'FAILS'} -- {p['part']}")
    print(f"wall time {wall / 60:.1f} min; wrote {root / 'results.json'}, {root / 'results.md'}"
          + (f" and {len(res['plots'])} plots (python -m lab.compare --publish copies them to results/, "
             f"docs/results.md and the README)" if not args.arms else ""))
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
