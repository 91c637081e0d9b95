"""
The measurement around exercise 6 (ex6_first_specialist.py): train a tiny
MoE with train.py's own functions, evaluate every few steps, keep the
expert-domain frequencies, and report the answer with the student's
`owned` and `first_owned`. Given code, shared by the exercise and its
reference solution; nothing to edit here.
"""

import argparse

import torch

import plumbing
import train
from data import load_corpus, val_batches


def measure(argv=None):
    p = argparse.ArgumentParser(description="Train a tiny MoE and report which domain first owns an expert. "
                                            "Other flags go to train.py (tiny preset).")
    p.add_argument("--balancer", default="global_aux")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10, help="evaluate every N steps (default: 10)")
    p.add_argument("--threshold", type=float, default=0.6, help="share of an expert's use that makes it a "
                                                                 "domain's own (default: 0.6)")
    p.add_argument("--min-use", type=float, default=0.5, help="and the least part of the domain's fair share of "
                                                              "tokens it must get (default: 0.5)")
    args, rest = p.parse_known_args(argv)
    targs = train.parse_args(["--preset", "tiny", "--val-seqs", "32", "--balancer", args.balancer,
                              "--steps", str(args.steps), *rest])
    # Tiny tensors: one thread is fastest, and on a busy machine extra threads
    # spin-wait (lab/compare.py runs every arm on one thread for the same reason).
    torch.set_num_threads(1)
    proc = plumbing.Proc.from_env(targs.device)
    plumbing.check_args(targs, proc.world_size)
    corpus = load_corpus(targs.data, seq_len=targs.seq_len, log=lambda *a: None)
    batches = val_batches(corpus, targs.seq_len, targs.batch_size // targs.grad_accum, targs.val_seqs)
    model, opt = train.build(targs, proc)
    history = []
    for step in range(targs.steps):
        train.train_step(model, opt, corpus, step, targs, proc)
        if (step + 1) % args.every == 0 or step + 1 == targs.steps:
            ev = train.evaluate(model, corpus, batches, proc)
            history.append((step + 1, torch.tensor(ev["expert_freq"])))
    return args, targs, corpus.domains, history


def report(argv, owned, first_owned):
    """Train, then print which domain first owns an expert, with the
    exercise's `owned` and `first_owned`."""
    args, targs, domains, history = measure(argv)
    first = first_owned(history, domains, args.threshold, args.min_use)
    at_end = owned(history[-1][1].double(), args.threshold, args.min_use).sum((0, 2)).tolist()
    print(f"{targs.balancer}, seed {targs.seed}, {targs.steps} steps, {targs.n_layers} layers x {targs.n_experts} "
          f"experts top-{targs.top_k}. An expert is a domain's own when the domain has more than "
          f"{args.threshold:.0%} of its use (and {args.min_use:.0%} of a fair share of its tokens); "
          f"checked every {args.every} steps.")
    width = max(map(len, domains))
    for name, n_end in zip(domains, at_end):
        got = first[name]
        if got is None:
            print(f"  {name:<{width}}  owns no expert at the end")
        else:
            print(f"  {name:<{width}}  owns an expert from step {got[0]:>4} on (then layer {got[1]} expert {got[2]}, "
                  f"{got[3]:.0%} of its use); {n_end} at the end")
    owners = sorted((got[0], name) for name, got in first.items() if got is not None)
    if not owners:
        print(f"Answer: no domain owns an expert at the end of {targs.steps} steps")
    else:
        tied = [name for step, name in owners if step == owners[0][0]]
        print(f"Answer: {' and '.join(tied)} {'gets its' if len(tied) == 1 else 'get their'} own expert first "
              f"(step {owners[0][0]})")
