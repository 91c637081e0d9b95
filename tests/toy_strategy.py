"""A throw-away strategy, added the way the README tells a student to: one
class and one registration line, nothing else in the project touched.

conftest.py imports this module, so the whole suite -- every test that is
parametrised over balancers.BALANCERS, the 2-rank equality tests, the resume
tests -- runs it beside the real strategies. If the suite passes with it, a
student's new strategy gets the same treatment for free. Its state is called
`ema`, not `bias`, on purpose: nothing may depend on a strategy's buffer
names. (tests/distributed.py imports it too, for the spawned processes.)"""

import torch

from balancers import Balancer, gate_scores, register, top_k_routing


class EmaPenalty(Balancer):
    """`toy_ema`: token choice that avoids recently busy experts. It keeps an
    exponential moving average of each expert's relative load (load / mean - 1)
    and subtracts a small multiple of it from the scores that choose the top-k
    (like lossfree's bias, it never touches the gate weight). Not from a
    paper: a test fixture."""
    summary = "test-only: top-k steered away from experts with a high average load"
    defaults = dict(Balancer.defaults, bias_rate=0.1)

    def __init__(self, n_experts, top_k, cfg, world_size=1):
        super().__init__(n_experts, top_k, cfg, world_size)
        self.register_buffer("ema", torch.zeros(n_experts, dtype=torch.float32))

    def route(self, logits):
        return top_k_routing(logits, gate_scores(logits, self.cfg.gate), self.top_k, -0.05 * self.ema)

    def step(self, load):
        load = load.float()
        self.ema.lerp_(load / load.mean().clamp(min=1) - 1, self.cfg.bias_rate)


register("toy_ema", EmaPenalty)
