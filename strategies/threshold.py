"""
strategies/threshold.py -- Expert Threshold routing (Sun, Liu, Wu, Sun 2026,
arXiv 2603.11535).

Expert choice lets each expert take the C tokens of the batch that score it
highest: balanced, but whether token t makes the cut depends on every other
token, later ones included. Expert Threshold keeps expert choice's cut and
learns it: each expert i has a threshold c_i, a running average of the
logit of the C-th token it would have taken, and every token is compared
with it on its own,

    token t uses expert i  iff  r_ti > c_i,      y_t = sum over those i of sigmoid(r_ti) E_i(x_t)

(no normalisation of the weights). A token's routing then depends only on
its own logits and on batches already trained on: causal, like token
choice, but a token may use 0 to E experts.
"""

import torch

from balancers import GATE, Balancer, Knob, Routing, all_reduce, gate_scores, register, top_k_routing
from strategies.quantile import BINS, histogram_bin, level_exceeded_by


class ExpertThreshold(Balancer):
    """`threshold`: expert i takes token t iff r_ti > c_i, weight the gate
    score (sigmoid(r_ti) by default).

    c_i follows expert i's C-th largest logit in the global batch, with
    C = N top_k / E for N tokens: the share of the N top_k assignments that
    token choice would make, so a token gets top_k experts on average, as
    expert choice's C = n c / E does with c = top_k (the paper gives
    k = N/E; the two agree at top_k = 1). "C-th largest" is taken as the
    level that C of the batch's logits exceed. Each optimizer step adds
    one such estimate x to an exponential average, bias-corrected as Adam
    corrects its moments:

        m_t = beta m_{t-1} + (1 - beta) x_t,      c = m_t / (1 - beta^t)

    beta = 0.99 as in the authors' code (0.999 in the paper). The global
    batch is every micro-step on every rank: as in strategies/quantile.py,
    each forward in training mode adds r_ti - c_i into a fixed-size
    histogram per expert (binned over [-8, 8] logits), step() sums them
    over ranks and reads the level off, so any split of the batch gives
    the same c to the last bit.

    Before the first step there is no average: the paper routes by plain
    expert choice for its first 4k steps, which would let a token's routing
    depend on the other tokens of its batch. Here the first step routes by
    plain top-k of the gate scores instead: causal, top_k experts per
    token, the load the threshold then aims for on average, and one step
    is enough for the bias-corrected average to hold a value. The paper's
    training capacity (0.5 to 1.5 C tokens per expert) is left out.
    """
    paper = "Sun, Liu, Wu, Sun 2026, \"Expert Threshold routing\" (arXiv 2603.11535)"
    summary = "experts take every token whose logit clears a running threshold: causal, 0..E experts a token"
    # Causal like token choice (a token's experts depend on its own logits and
    # the state alone), but not k experts a token: the layer sums 0..E rows.
    fixed_k = False
    knobs = dict(Balancer.knobs, gate=GATE.but(default="sigmoid"),
                 threshold_ema=Knob(0.99, "decay beta of each expert's threshold average (authors' code 0.99, "
                                          "paper 0.999)", low=0, high=1, open_high=True),
                 bins=BINS)
    span = 8.0      # r - c is binned over [-span, span]: logit units

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        # c (already bias-corrected) and t, the number of estimates averaged into it.
        self.register_buffer("threshold", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # Scratch for the current optimizer step, zero again after step().
        self.register_buffer("hist", torch.zeros(n_experts, 2 * self.cfg.bins + 1, dtype=torch.long),
                             persistent=False)

    def route(self, logits):
        E = logits.shape[-1]
        scores = gate_scores(logits, self.cfg.gate)
        if self.training:
            # Remember where this batch's logits lie for the *next* batches'
            # threshold; evaluation must not move it.
            slot = histogram_bin(logits.detach().reshape(-1, E) - self.threshold, self.span, self.cfg.bins)
            slot = (slot + torch.arange(E, device=logits.device) * self.hist.shape[1]).reshape(-1)
            self.hist.view(-1).scatter_add_(0, slot, torch.ones_like(slot))
        if self.updates == 0:                          # no average yet (one read of a device value)
            return top_k_routing(logits, scores, self.top_k)
        # Sun et al.: token t uses expert i iff r_ti > c_i, each pair on its own.
        token_idx, expert_idx = (logits.detach().reshape(-1, E) > self.threshold).nonzero(as_tuple=True)
        weight = scores.reshape(-1, E)[token_idx, expert_idx]
        probs = scores / scores.sum(-1, keepdim=True)
        return Routing(token_idx, expert_idx, weight, probs, logits)

    def step(self, load):
        all_reduce(self.hist, self.world_size)
        tokens = self.hist[0].sum()                    # every token adds one logit to every expert
        capacity = tokens.double() * self.top_k / self.n_experts
        # Sun et al.: x_i = expert i's C-th largest logit in the batch, here c_i
        # plus the level that C of the binned r_ti - c_i exceed.
        estimate = self.threshold + level_exceeded_by(self.hist, capacity, self.span)
        t = self.updates + 1
        beta = self.cfg.threshold_ema
        # Adam's bias correction written on c itself: c_t = m_t / (1 - beta^t)
        # is c_{t-1} moved towards x_t by (1 - beta) / (1 - beta^t), which is 1
        # at t = 1 (c = the first estimate) and tends to 1 - beta.
        moved = self.threshold.lerp(estimate, ((1 - beta) / (1 - beta ** t.double())).float())
        seen = tokens > 0
        self.threshold.copy_(torch.where(seen, moved, self.threshold))
        self.updates += seen.long()
        self.hist.zero_()


register("threshold", ExpertThreshold)
