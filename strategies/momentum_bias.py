"""
strategies/momentum_bias.py -- SMEBU, soft-clamped momentum expert bias
updates (Arcee, Trinity Large technical report, arXiv 2602.17004, Eqs. 23-28).

Loss-free balancing with another step(): lossfree moves every bias by the
same +-u whatever the size of the imbalance, so near balance each expert's
bias flips direction step after step. SMEBU scales the step with the
imbalance, softly clamped by tanh so that a badly loaded expert moves no
faster than lambda, and smooths it with momentum, which damps the flipping.
"""

import torch

from balancers import Knob, LossFree, register


class MomentumBias(LossFree):
    """`momentum_bias`: lossfree's bias and routing (top-k of s + b, gate
    weight the unbiased s), updated once per optimizer step from the global
    loads n by

        v  = (mean(n) - n) / mean(n)       normalised violation, > 0: underloaded
        db = lambda * tanh(kappa * v)      soft clamp: |db| < lambda
        db = db - mean(db)                 the biases keep mean 0
        m  = beta_m * m + (1 - beta_m) * db
        b  = b + m

    Defaults are the report's (256 experts, top-4): lambda 5e-4, beta_m 0.5,
    kappa 2. State: the bias and the momentum m."""
    paper = "Arcee 2026, Trinity Large report, Eqs. 23-28 (SMEBU)"
    summary = "lossfree with a tanh-clamped, momentum-smoothed bias step (SMEBU)"
    knobs = dict({name: knob for name, knob in LossFree.knobs.items() if name != "bias_update"},
                 bias_rate=LossFree.knobs["bias_rate"].but(
                     default=5e-4, help="lambda: the largest bias step, lambda tanh(kappa v) (Trinity: 5e-4)"),
                 bias_momentum=Knob(0.5, "beta_m: momentum of the bias step (Trinity: 0.5)", low=0, high=1,
                                    open_high=True),
                 kappa=Knob(2.0, "kappa: slope of the soft clamp tanh(kappa v) (Trinity: 2)", low=0, open_low=True))

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        self.register_buffer("momentum", torch.zeros(n_experts, dtype=torch.float32))

    def step(self, load):
        load = load.float()
        mean = load.mean().clamp(min=1)                # no tokens at all: v = 0, not 0 / 0
        # Eqs. 23-28, the normalised violation: v = (mean(n) - n) / mean(n)
        v = (mean - load) / mean
        # Eqs. 23-28, the soft clamp: db = lambda tanh(kappa v)
        db = self.cfg.bias_rate * torch.tanh(self.cfg.kappa * v)
        # Eqs. 23-28, re-centring: db -= mean(db), so the biases do not drift together
        db -= db.mean()
        # Eqs. 23-28, momentum: m = beta_m m + (1 - beta_m) db
        self.momentum.mul_(self.cfg.bias_momentum).add_((1 - self.cfg.bias_momentum) * db)
        # Eqs. 23-28, the bias moves by the momentum: b += m
        self.bias += self.momentum


register("momentum_bias", MomentumBias)
