"""
Exercise 3: token dropping with a capacity factor (Fedus et al. 2021,
Switch Transformers, Sec. 2.2, "Distributed Switch Implementation").

Real accelerators want fixed shapes, so Switch gives every expert a fixed
number of slots per routing group,

    C = ceil(capacity_factor * k * T / E)     assignments per expert and sequence

(k * T / E is an expert's share under perfect balance). Tokens are routed by
plain top-k; an expert that is full *drops* the assignments that arrive
after its C-th. A dropped assignment is simply missing from the Routing: the
MoE layer then adds nothing for it, and the token travels on unchanged
through the residual connection (moe.MoELayer.combine).

Who is first matters. Switch fills the slots in token order. GShard's top-2
(Lepikhin et al. 2020, Algorithm 1) fills every token's *first* choice of
the group before any second choice: then a later token's first choice can
take the slot of an earlier token's second choice, and the earlier output
depends on the future -- the leak of expert choice (Wang et al. 2024,
Sec. 5.2) in a milder form. Here each sequence is its own group and the queue
runs token by token (a token's k choices best first), so the model stays
exactly causal.

Afterwards, train with it and compare MaxVio and loss with `none`:

    python -m exercises.run --balancer ex3_capacity_drop --capacity-factor 1.0

Write route(). Check with `python -m pytest exercises -k ex3`.
"""

import math

import torch.nn.functional as F

from balancers import Balancer, ExpertChoice, Routing, gate_scores, register, top_k_routing


class CapacityTopK(Balancer):
    """`ex3_capacity_drop`: top-k with at most C assignments per expert and
    sequence; the rest are dropped."""
    paper = "Fedus et al. 2021 (Switch), Sec. 2.2"
    summary = "top-k that drops what exceeds C = c k T / E per expert and sequence"
    # capacity_factor: Switch trained with 1.0 to 1.25. (Expert choice's knob
    # reads C = n c / E: with k assignments per token the
    # share of an expert is k n / E, hence the k here.)
    knobs = dict(Balancer.knobs, capacity_factor=ExpertChoice.knobs["capacity_factor"].but(default=1.25))

    def route(self, logits):
        B, T, E = logits.shape
        k = self.top_k
        full = top_k_routing(logits, gate_scores(logits, self.cfg.gate), k)   # token by token, best choice first
        C = math.ceil(self.cfg.capacity_factor * k * T / E)
        # Each assignment's place in its expert's queue, within its sequence:
        # a running count (cumsum) of one-hot rows taken in queue order.
        onehot = F.one_hot(full.expert_idx.view(B, T, k), E)               # [B, T, k, E]
        place = onehot.flatten(1, 2).cumsum(1).view(B, T, k, E)            # queue order: token, then choice
        place = (place * onehot).sum(-1).reshape(-1)                       # 1 for the first to arrive, 2, ...
        keep = place <= C
        return Routing(full.token_idx[keep], full.expert_idx[keep], full.weight[keep], full.probs, logits)


register("ex3_capacity_drop", CapacityTopK)
