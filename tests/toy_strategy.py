"""toy_strategy.py -- a strategy of my own, in a file of its own.

    python train.py --import toy_strategy.py --balancer toy_ema --ema-decay 0.8

Top-k that steers away from experts that were busy lately: an exponential
moving average of each expert's relative load (load / mean - 1) is
subtracted, times `penalty`, from the scores that choose the top-k. Like
lossfree's bias it never touches the gate weight. Not from a paper.
"""

import torch

from balancers import Balancer, Knob, gate_scores, register, top_k_routing


class EmaPenalty(Balancer):
    summary = "top-k steered away from experts with a high average load"    # its line in --help
    # Its own knobs, each a checked flag (--ema-decay) with a default and a range:
    # decay 1 would freeze the average, so the range is open at 1.
    knobs = dict(Balancer.knobs,
                 ema_decay=Knob(0.9, "how slowly the average load forgets", low=0, high=1, open_high=True),
                 penalty=Knob(0.05, "how hard a busy expert is avoided", low=0))

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        # State: a buffer, so it is logged, saved in checkpoints and checked across ranks.
        self.register_buffer("ema", torch.zeros(n_experts))

    def route(self, logits):
        # Choose with the penalty, weigh without it.
        choice_bias = -self.cfg.penalty * self.ema
        return top_k_routing(logits, gate_scores(logits, self.cfg.gate), self.top_k, choice_bias)

    def step(self, load):
        # Once per optimizer step, with the exact counts of the whole global batch.
        load = load.float()
        self.ema.lerp_(load / load.mean().clamp(min=1) - 1, 1 - self.cfg.ema_decay)


register("toy_ema", EmaPenalty)
