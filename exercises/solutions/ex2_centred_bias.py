"""
Exercise 2: keep the loss-free bias centred (Wang et al. 2024, Alg. 1, and
the systems that ship it).

Top-k only compares the scores of one token with each other, so adding the
same constant to every expert's bias changes no decision. The sign update
b_i += u sign(e_i) does not add up to zero, though (three experts above the
mean and one below: three steps down, one up), so the plain bias drifts as
a whole. Some shipped implementations subtract the mean of the update: the
bias stays zero-mean, so its log is readable and comparable across layers
and runs, and every top-k decision is exactly plain lossfree's. (An
optional refinement: the decisions, hence training, do not change.)

Write step(). Check with `python -m pytest exercises -k ex2`.
"""

import torch

from balancers import LossFree, register


class CentredLossFree(LossFree):
    """`ex2_lossfree_centred`: lossfree whose bias update has its mean removed.
    route() is LossFree's: only step() differs."""
    paper = "Wang et al. 2024, Alg. 1 (with the update centred)"
    summary = "lossfree with a zero-mean bias: the same decisions, no drift"

    def step(self, load):
        # Alg. 1's update, exactly as LossFree.step computes it ...
        load = load.float()
        error = load.mean() - load                           # > 0: underloaded
        if self.cfg.bias_update == "sign":
            update = self.cfg.bias_rate * torch.sign(error)
        else:
            update = self.cfg.bias_rate * error / load.mean().clamp(min=1)
        # ... minus its mean: one constant shared by every expert, so no top-k
        # decision changes, and a bias that starts at zero mean stays there.
        # (The proportional update's mean is already 0, since the errors
        # e_i = mean(c) - c_i add up to 0; the sign update's is not.)
        self.bias += update - update.mean()


register("ex2_lossfree_centred", CentredLossFree)
