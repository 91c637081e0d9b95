"""
Exercise 8: find the bug in a loss-free balancer (Wang et al. 2024, Eq. 3
and Alg. 1).

A find-the-bug exercise: the file below is a complete Loss-Free Balancing
strategy, written from scratch in one class, and it trains and balances.
It also carries a bug that shipped in a course notebook: deepspeed-course
PR #26 (the thread, and the gallery's docs/demons.md, give the answer away:
read them afterwards).

What was observed. Trained next to `lossfree` with the same seed, it
balances about as well, but the two runs' losses part early, and the bias
in log.jsonl is odd: lossfree's moves by exactly u = 1e-3 per step, so it
always sits on multiples of u; this one's does not, not even after step 1.

Find it, fix it, and say what it was in DIAGNOSIS below (one line; the
checker reports "not started" until DIAGNOSIS is written). Check with
`python -m pytest exercises -k ex8`.
"""

import torch
import torch.nn as nn

from balancers import Balancer, LossFree, Routing, gate_scores, register

DIAGNOSIS = None      # your one line: what was wrong


class BiasSteeredTopK(Balancer):
    """`ex8_lossfree`: Loss-Free Balancing (Wang et al. 2024, Alg. 1).

    Each expert has a bias b_i that steers which k experts a token goes to;
    after every optimizer step it moves against the load just seen,
    b_i += u * sign(mean load - load_i). No loss is added, and the bias is
    the strategy's state, nothing the optimizer trains."""
    paper = "Wang et al. 2024, Eq. 3 and Alg. 1"
    summary = "loss-free balancing, written from scratch (exercise 8)"
    knobs = dict(Balancer.knobs, gate=LossFree.knobs["gate"], bias_rate=LossFree.knobs["bias_rate"])

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        self.bias = nn.Parameter(torch.zeros(n_experts))

    def route(self, logits):
        B, T, E = logits.shape
        scores = gate_scores(logits, self.cfg.gate) + self.bias
        expert_idx = scores.detach().topk(self.top_k, dim=-1).indices
        weight = scores.gather(-1, expert_idx)
        token_idx = torch.arange(B * T, device=logits.device).repeat_interleave(self.top_k)
        probs = scores / scores.sum(-1, keepdim=True)
        return Routing(token_idx, expert_idx.reshape(-1), weight.reshape(-1), probs, logits)

    @torch.no_grad()
    def step(self, load):
        load = load.float()
        self.bias += self.cfg.bias_rate * torch.sign(load.mean() - load)


register("ex8_lossfree", BiasSteeredTopK)
