"""
Exercise 6: which domain gets its own expert first? (Qiu et al. 2025, Sec. 4
and Fig. 1b: expert selection frequency per domain.)

Qiu et al. measure specialisation by how often each expert is among the
top-k of a domain's tokens; with global-batch balancing some experts end up
serving mostly one domain (math, code). This exercise watches that happen
during training and answers an open question on this project's corpus (code,
math, prose): which domain is the first to own an expert, and when?

Ownership. train.evaluate returns expert_freq[l][d][e]: the fraction of
domain d's validation tokens that chose expert e in layer l. Expert e's use
is split between the domains in proportion to those frequencies,

    share[l, d, e] = freq[l, d, e] / sum_d' freq[l, d, e]

(per token of each domain, so a domain with more validation text does not
look more specialised). Expert e of layer l is domain d's own when

    share[l, d, e] > threshold                      (default 0.6)
    freq[l, d, e] >= min_use * sum_e' freq[l, d, e'] / E   (default 0.5)

the second condition because an expert that almost nobody uses is "owned"
by whichever domain sent it its last few tokens: a dying expert is not a
specialist. It must get at least half of its fair share of d's tokens.

Early in training ownership flickers (the router is nearly random), so the
answer counts a domain from the evaluation after which it always owns at
least one expert (not necessarily the same one).

Write ownership(), owned() and first_owned(); check them with
`python -m pytest exercises -k ex6`; then run the measurement (about ten
seconds on one CPU core) and see whether the answer depends on the balancer,
the seed or the threshold:

    python -m exercises.ex6_first_specialist                         # global_aux
    python -m exercises.ex6_first_specialist --balancer aux --balance-seqs 1
    python -m exercises.ex6_first_specialist --balancer lossfree --seed 1
"""

import argparse

import torch

import plumbing
import train
from data import load_corpus, val_batches


def ownership(freq):
    """freq [L, D, E] (fraction of domain d's tokens that chose expert e in
    layer l) -> share [L, D, E]: domain d's part of expert e's use. It sums to
    1 over domains for every expert someone uses, and is 0 (not NaN) for an
    expert nobody uses."""
    raise NotImplementedError("exercise 6: write ownership()")


def owned(freq, threshold=0.6, min_use=0.5):
    """freq [L, D, E] -> bool [L, D, E]: expert e of layer l is domain d's own
    (share above `threshold`, and at least `min_use` of d's fair share of
    assignments, sum_e freq[l, d, e] / E)."""
    raise NotImplementedError("exercise 6: write owned()")


def first_owned(history, domains, threshold=0.6, min_use=0.5):
    """history: [(step, freq [L, D, E]), ...] in training order ->
    {domain: (step, layer, expert, share) or None}: for each domain, the step
    from which it owns an expert at every later evaluation -- for good, not
    by a fluke of early training -- and the expert it owns then with the
    largest share; None if it owns none at the last evaluation."""
    raise NotImplementedError("exercise 6: write first_owned()")


# ----------------------------------------------------------------------------
# The measurement: train with train.py's own functions, evaluate every few
# steps, and keep the expert-domain frequencies.

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
    # spin-wait (compare.py runs every arm on one thread for the same reason).
    torch.set_num_threads(1)
    proc = plumbing.Proc.from_env(targs.device)
    train.check_args(targs, proc.world_size)
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


def main(argv=None):
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


if __name__ == "__main__":
    main()
