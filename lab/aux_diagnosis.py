"""
lab/aux_diagnosis.py -- why the aux loss balances under the softmax gate and
hardly at all under the sigmoid gate with Wang et al.'s raw P (Eq. 2), in
numbers.

    python -m lab.aux_diagnosis                       # sigmoid and softmax, alpha 1e-2, claims' shape
    python -m lab.aux_diagnosis --alpha 1e-1 --steps 300

The aux loss moves routing only by changing the *order* of a token's expert
scores. Its gradient on the logit u_{t,i} of token t and expert i is, up to
the common factor alpha N / T (T: the tokens of the balance group),

    softmax:  s_i (f_i - sum_j f_j s_j)   negative for an expert used less than
                                          the token's weighted average: it
                                          raises the idle experts and lowers
                                          the busy ones, which re-ranks;
    sigmoid:  f_i s_i (1 - s_i)           never negative: it lowers every
                                          score, and least where s is near 1
                                          (the busiest experts' saturated
                                          scores) or near 0.

For each gate this trains one run (train.py's flags, the claims' model
shape), stops it at a few steps with the same schedule (--stop-at,
--resume), and on one fixed training batch reports, per layer and averaged:
  - MaxVio of that batch;
  - the mean score of each token's chosen experts and of the others;
  - the "re-ranking push": for each token, the aux gradient on its k-th
    chosen expert's logit minus that on its best unchosen expert's, in
    units of the mean |gradient| (positive: the step lowers the chosen one
    more than its nearest rival, so the order can change; near 0: it
    lowers both alike);
  - the share of gradient entries that are negative (that raise a score);
  - the aux gradient's mean size on the logits over the language-model
    loss's (how much say the aux loss has in the router's update).
Lab tool (not the lesson): docs/comparison.md has the figures it printed.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import plumbing
import train
from balancers import gate_scores
from data import get_batch, load_corpus
from lab.claims import SIZES


def measure(model, x):
    """The figures above for one model on one batch x [B, T]."""
    model.train()
    out = model(x)
    layers = [r.logits for r in out.routings]
    grads = torch.autograd.grad(out.balance_loss, layers, retain_graph=True)
    y = torch.roll(x, -1, 1)            # the next bytes (the last wraps round: a gradient's size, not a loss)
    lm = torch.autograd.grad(torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), y), layers)
    k = model.cfg.top_k
    rows = []
    for routing, g, g_lm in zip(out.routings, grads, lm):
        E = g.shape[-1]
        load = torch.bincount(routing.expert_idx, minlength=E).float()
        scores = gate_scores(routing.logits.detach(), model.cfg.balance["gate"]).reshape(-1, E)
        g = g.reshape(-1, E)
        order = routing.logits.detach().reshape(-1, E).argsort(-1, descending=True)
        chosen, rival = order[:, k - 1], order[:, k]
        push = g.gather(1, chosen[:, None]) - g.gather(1, rival[:, None])
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :k], True)
        rows.append({"maxvio": ((load.max() - load.mean()) / load.mean()).item(),
                     "score_chosen": scores[picked].mean().item(), "score_other": scores[~picked].mean().item(),
                     "push": (push.mean() / g.abs().mean().clamp(min=1e-30)).item(),
                     "negative_share": (g < 0).float().mean().item(),
                     "aux_over_lm": (g.abs().mean() / g_lm.abs().mean().clamp(min=1e-30)).item()})
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def run(gate, args, work):
    """Train one arm to each stop and measure it there."""
    size = SIZES["default"]
    flags = size["model"] + size["fine"] + ["--balancer", "aux", "--gate", gate, "--alpha", str(args.alpha),
                                            "--balance-seqs", str(args.balance_seqs), "--steps", str(args.steps),
                                            "--batch-size", str(size["batch"]), "--seed", str(args.seed),
                                            "--out", str(work / gate), "--log-every", "50"]
    corpus = load_corpus(None, seq_len=64, log=lambda *a: None)
    x = get_batch(corpus, 0, 12345, size["batch"], 64)[0]            # one fixed batch, no claim's seed
    out = []
    stops = [s for s in (1, args.steps // 10, args.steps // 4, args.steps // 2, args.steps) if s >= 1]
    for i, stop in enumerate(dict.fromkeys(stops)):
        more = ["--resume"] if i else ["--overwrite"]
        more += ["--stop-at", str(stop)] if stop < args.steps else []
        if train.main(flags + more) != 0:
            raise RuntimeError(f"training {gate} stopped with an error")
        model, _ = plumbing.load_model(work / gate)
        out.append({"step": stop, **measure(model, x)})
        print(f"{gate:8s} step {stop:4d}: " + "  ".join(f"{k} {v:+.3f}" for k, v in out[-1].items() if k != "step"),
              flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.aux_diagnosis",
                                description="Why the sigmoid-gate aux loss balances poorly: score levels and the aux "
                                            "gradient's re-ranking push over training, sigmoid against softmax.")
    p.add_argument("--alpha", type=float, default=1e-2, help="aux coefficient per layer (default 1e-2)")
    p.add_argument("--balance-seqs", type=int, default=2, help="sequences per balance group (default 2)")
    p.add_argument("--steps", type=int, default=500, help="training steps (default 500, the claims' length)")
    p.add_argument("--seed", type=int, default=2000, help="seed (default 2000: never a claim's seed)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="aux-diagnosis-") as work:
        result = {gate: run(gate, args, Path(work)) for gate in ("sigmoid", "softmax")}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
