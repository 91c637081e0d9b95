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

import math  # noqa: F401  (you will want these)

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

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
        """logits [B, T, E] -> Routing: plain top-k (balancers.top_k_routing
        gives it, token by token, a token's choices best first), minus every
        assignment that arrives at an expert after that expert already has C
        assignments from the same sequence. Queue order: token 0's choices,
        then token 1's, ... Keep Routing.probs as top-k's."""
        raise NotImplementedError("exercise 3: write CapacityTopK.route()")


register("ex3_capacity_drop", CapacityTopK)
