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

import torch

from balancers import Balancer, LossFree, Routing, gate_scores, register


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
        scores = gate_scores(logits, self.cfg.gate)                   # s_{i,t} > 0 for sigmoid and softmax
        B, T, E = scores.shape
        # The multiplier only decides *which* experts win. detach(): the
        # choice is a comparison, not a value, so nothing here needs gradient.
        expert_idx = (scores.detach() * self.mult).topk(self.top_k, dim=-1).indices   # [B, T, k]
        # The weight is the unscaled score, so the multiplier never enters the
        # forward value and gets no gradient (Wang et al. 2024, Eq. 3).
        weight = scores.gather(-1, expert_idx)
        token_idx = torch.arange(B * T, device=logits.device).repeat_interleave(self.top_k)
        probs = scores / scores.sum(-1, keepdim=True)
        return Routing(token_idx, expert_idx.reshape(-1), weight.reshape(-1), probs, logits)

    def step(self, load):
        # Alg. 1's error, e_i = mean(c) - c_i: > 0 for an underloaded expert.
        load = load.float()
        error = load.mean() - load
        # Multiply, don't add: m_i * (1 + u sign(e_i)) moves by the same
        # *relative* amount whatever m_i is, and stays positive for u < 1.
        # Adding u sign(e_i) would drive an always-busy expert's multiplier
        # through zero, and a negative multiplier makes that expert prefer the
        # tokens that score it *lowest*.
        self.mult *= 1 + self.cfg.bias_rate * torch.sign(error)


# One line registers the strategy (balancers.py's README step), here at import
# time so that nothing else in the project needs to change.
register("ex1_mult_bias", MultiplicativeBias)
