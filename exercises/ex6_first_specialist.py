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

import torch  # noqa: F401 (for your code)

from exercises import specialists


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


def main(argv=None):
    """Train and print the answer (the code around your functions is in
    exercises/specialists.py)."""
    specialists.report(argv, owned, first_owned)


if __name__ == "__main__":
    main()
