"""
Exercise 1: a multiplicative bias (Wang et al. 2024, Sec. 4.3).

Loss-Free Balancing adds a bias b_i to expert i's score to choose the top-k
(balancers.LossFree). The paper also tried *scaling* the score instead:

    expert i is chosen for token t  if  s_{i,t} * m_i  is in TopK({s_{j,t} * m_j}, K)
    gate weight                       g_{i,t} = s_{i,t}   (unscaled, as before)

with one multiplier m_i per expert, starting at 1, nudged after every
optimizer step against the load just observed. They found the additive
bias slightly better; with this class you can measure it yourself:

    python -m exercises.run --balancer ex1_mult_bias      (and --balancer lossfree)

Write route() and step(). Check with `python -m pytest exercises -k ex1`.
"""

import torch  # noqa: F401

from balancers import Balancer, LossFree, Routing, gate_scores, register  # noqa: F401


class MultiplicativeBias(Balancer):
    """`ex1_mult_bias`: lossfree with a per-expert multiplier on the choice scores."""
    paper = "Wang et al. 2024, Sec. 4.3 (the multiplicative variant)"
    summary = "a per-expert multiplier that only steers the top-k choice, no loss"
    knobs = dict(Balancer.knobs, gate=LossFree.knobs["gate"], bias_rate=LossFree.knobs["bias_rate"])

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        # State, not a parameter: fp32, saved in checkpoints, never trained by
        # the optimizer (the same reasons as lossfree's bias).
        self.register_buffer("mult", torch.ones(n_experts, dtype=torch.float32))

    def route(self, logits):
        """logits [B, T, E] -> Routing with B*T*k assignments.

        Each token gets the k experts with the largest s_{i,t} * m_i, where
        s = gate_scores(logits, self.cfg.gate) and m = self.mult; the weight
        of an assignment is the *unscaled* s_{i,t}. Look at
        balancers.top_k_routing: yours is the same with one line changed (it
        only knows an additive bias). Routing.probs is s normalised to sum 1
        per token."""
        raise NotImplementedError("exercise 1: write MultiplicativeBias.route()")

    def step(self, load):
        """Once per optimizer step, with load[i] = the number of assignments
        expert i received over the whole global batch just trained on.
        Lower the multiplier of an expert above the mean load, raise it below,
        leave it at the mean, by a relative amount u = self.cfg.bias_rate.
        The multiplier must stay positive, however long an expert stays busy."""
        raise NotImplementedError("exercise 1: write MultiplicativeBias.step()")


# One line registers the strategy (balancers.py's README step), here at import
# time so that nothing else in the project needs to change.
register("ex1_mult_bias", MultiplicativeBias)
