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

import torch  # noqa: F401

from balancers import LossFree, register  # noqa: F401


class CentredLossFree(LossFree):
    """`ex2_lossfree_centred`: lossfree whose bias update has its mean removed.
    route() is LossFree's: only step() differs."""
    paper = "Wang et al. 2024, Alg. 1 (with the update centred)"
    summary = "lossfree with a zero-mean bias: the same decisions, no drift"

    def step(self, load):
        """Once per optimizer step, with load[i] = the assignments expert i
        received over the global batch just trained on. Compute the update
        LossFree.step would add to self.bias (both rules: self.cfg.bias_update
        is "sign" or "proportional"), then add it with its mean removed."""
        raise NotImplementedError("exercise 2: write CentredLossFree.step()")


register("ex2_lossfree_centred", CentredLossFree)
