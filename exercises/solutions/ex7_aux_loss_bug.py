"""
Exercise 7: find the bug in an aux loss (Fedus et al. 2021, Sec. 2.2).

A find-the-bug exercise: the file below is a complete load-balancing loss,
written from scratch the way many MoE codebases write it, and it trains.
It also carries a bug that shipped in widely used code: OLMoE #45 and
minimind #290 (the threads, and the gallery's docs/demons.md, give the
answer away: read them afterwards).

What was observed. At top-1 this loss agrees to the last digit with
`aux` over the same tokens (`balancers.AuxLoss` with one balance group per
micro-batch). At the tiny preset (top-2) a freshly initialised model,
whose router cannot yet tell the experts apart, logs a balance loss of
about 2 x alpha per layer where `aux` logs about alpha; a colleague who
tried top-4 saw about 4 x alpha. The loss still pushes the busy experts
down, so nothing crashes: every alpha copied from a paper is silently
multiplied by something.

Find it, fix it, and say what it was in DIAGNOSIS below (one line; the
checker reports "not started" until DIAGNOSIS is written). Check with
`python -m pytest exercises -k ex7`.
"""

from balancers import ALPHA, Balancer, count_per_expert, gate_scores, register

DIAGNOSIS = ("f_i was divided by the T tokens, but top-k makes k assignments per token, so f summed to k and "
             "the loss was k times Switch's; f must be divided by the k T assignments")


class SwitchAux(Balancer):
    """`ex7_aux`: the Switch load-balancing loss over the whole micro-batch,

        loss = alpha * E * sum_i f_i * P_i

    f_i the fraction of the routing decisions that went to expert i (no
    gradient), P_i the mean router probability of expert i (the gradient).
    A router that spreads evenly scores exactly alpha: Switch's minimum."""
    paper = "Fedus et al. 2021 (Switch), Sec. 2.2"
    summary = "aux loss over the micro-batch, written from scratch (exercise 7)"
    knobs = dict(Balancer.knobs, alpha=ALPHA)

    def loss(self, routing):
        B, T, E = routing.probs.shape
        counts = count_per_expert(routing.expert_idx, E)
        # Each token makes top_k decisions, so the batch holds k T of them:
        # f must be a fraction of those for the loss to mean Switch's alpha.
        f = counts.float() / counts.sum().clamp(min=1)
        P = gate_scores(routing.logits, self.cfg.gate).reshape(B * T, E).mean(0)
        return self.cfg.alpha * E * (f * P).sum()


register("ex7_aux", SwitchAux)
