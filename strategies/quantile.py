"""
strategies/quantile.py -- Quantile Balancing (Su, "MoE Journey" part 6;
Megatron-LM's `quantile_balancing` router option).

Routing k experts per token with mk/n tokens per expert (m tokens, n
experts) is the assignment LP

    max sum_ij x_ij s_ij   s.t.  sum_j x_ij = k,  sum_i x_ij = mk/n,  0 <= x <= 1

whose dual has a price alpha_i per token and a price beta_j per expert.
Routing by the top-k of s - beta is reading off the primal from the dual;
lossfree nudges beta by a fixed step in the direction of sign(load - mean)
(SignSGD on the dual). Quantile Balancing instead solves for beta exactly,
one coordinate at a time, once per optimizer step:

    alpha_i = the (k+1)-th largest of s_i,: - beta        (the token's price)
    beta_j  = the (mk/n + 1)-th largest of s_:,j - alpha  (the expert's price,
              i.e. the (1 - k/n) quantile of that column)

No learning rate. The new beta replaces the old one (Megatron's EMA,
`beta_ema`, defaults to 0) and is re-centred to mean 0, which changes no
choice. With two experts and top-1 one such step balances the batch it was
computed on exactly; with more experts it is one step of coordinate descent
and the balance comes over a few steps.
"""

import torch

from balancers import (GATE, TOKEN_CHOICE_KNOBS, Balancer, Knob, all_reduce, gate_scores, register,
                       token_choice_options, top_k_routing)

BINS = Knob(4096, "bins on each side of 0 in each expert's histogram of the global batch (more: closer to "
                  "the exact statistic, more memory and a larger all-reduce)", low=1)


def histogram_bin(values, span, side):
    """The bin of each value: `side` bins of width span/side on each side of
    0, and one bin of its own for exactly 0, in order: index
    side + sign(x) ceil(|x| / width), the end bins also holding whatever
    lies beyond +-span. Exactly 0 gets its own bin because in quantile
    balancing every token's (k+1)-th expert sits exactly on its price, a
    tie a bin of any width would smear."""
    width = span / side
    return (side + values.sign() * (values.abs() / width).ceil().clamp_(max=side)).long()


def level_exceeded_by(hist, count, span):
    """hist [E, 2 side + 1]: integer counts in histogram_bin's bins. For each
    row, the level that `count` of the row's values exceed (a float count
    is fine).

    Read from the top: the bin where the count runs out holds A values
    above it and c of its own, A <= count < A + c; the level is placed as
    if those c values were spread evenly over the bin, so that count - A
    of them lie above it. When the count-th and (count+1)-th values are in
    different bins it is the top of the lower one's bin, and exactly
    `count` values lie above; in the bin of exactly 0 it is 0. With count
    or fewer values in all, it is -span."""
    side = hist.shape[-1] // 2
    width = span / side
    above = hist.flip(-1).cumsum(-1).flip(-1)                 # above[b]: values in bins b and higher
    b = (above > count).sum(-1) - 1                           # above[] only falls, so bins 0..b exceed count
    inside = b.clamp(min=0)
    rest = torch.cat([above[:, 1:], above.new_zeros(hist.shape[0], 1)], dim=1)
    A = rest.gather(1, inside[:, None])[:, 0].double()
    c = hist.gather(1, inside[:, None])[:, 0].double().clamp(min=1)
    j = (inside - side).double()                              # bin j > 0: ((j-1) w, j w]; j < 0: [j w, (j+1) w)
    top = torch.where(j > 0, j * width, torch.where(j < 0, (j + 1) * width, torch.zeros_like(j)))
    level = top - torch.where(j == 0, 0.0, width) * (count - A) / c
    return torch.where(b >= 0, level, torch.full_like(level, -span)).float()


class QuantileBalancing(Balancer):
    """`quantile`: route by the top-k of s - beta, gate weight the unbiased
    s; after each optimizer step set beta to the exact dual coordinate step
    (Su, part 6) computed on the whole global batch.

    The global batch, not the micro-batch: Megatron computes a beta per
    micro-batch and averages them over micro-batches and data-parallel
    ranks, so its beta depends on how the batch is cut up. Here every
    forward in training mode adds each (token, expert) margin
    (s_ij - beta_j) - alpha_i into a fixed-size histogram per expert (a
    non-persistent buffer); step() sums the histograms over ranks and reads
    the quantile off them. Integer counts add exactly in any order, so any
    split over ranks and micro-steps gives the same beta to the last bit,
    on every rank, as one process would. The price is resolution: the
    margins are binned over [-1, 1] (`bins` bins each side of 0, and one
    for exactly 0; a score difference under a sigmoid or softmax gate lies
    in that range unless the betas spread by more), so the quantile is
    exact to within a bin (1/bins) and one step moves beta by at most 1.
    """
    paper = "Su 2026, \"MoE Journey\" part 6 (Quantile Balancing); Megatron-LM quantile_balancing"
    summary = "beta set once per step to the exact dual (quantile) solution: no learning rate"
    knobs = dict(Balancer.knobs, **TOKEN_CHOICE_KNOBS, gate=GATE.but(default="sigmoid"),
                 beta_ema=Knob(0.0, "weight of the old beta when the new one is set (Megatron: 0, pure "
                                    "replacement)", low=0, high=1, open_high=True),
                 bins=BINS)
    span = 1.0      # margins are binned over [-span, span]: score units

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        # Su's sign: choose the top-k of s - beta (lossfree's b is -beta).
        self.register_buffer("beta", torch.zeros(n_experts, dtype=torch.float32))
        # Scratch for the current optimizer step, zero again after step().
        self.register_buffer("hist", torch.zeros(n_experts, 2 * self.cfg.bins + 1, dtype=torch.long),
                             persistent=False)

    def route(self, logits):
        scores = gate_scores(logits, self.cfg.gate)
        if self.training and self.top_k < self.n_experts:
            self.count_margins(scores.detach())
        return top_k_routing(logits, scores, self.top_k, -self.beta, **token_choice_options(self.cfg))

    def count_margins(self, scores):
        """Add (s_ij - beta_j) - alpha_i of every token i and expert j to
        expert j's histogram, with the beta routing uses now."""
        E, bins = self.n_experts, self.hist.shape[1]
        shifted = scores.reshape(-1, E) - self.beta
        # Su, part 6: alpha_i = the (k+1)-th largest of s_i - beta.
        alpha = shifted.topk(self.top_k + 1, dim=-1).values[:, -1:]
        slot = histogram_bin(shifted - alpha, self.span, self.cfg.bins) + torch.arange(E, device=scores.device) * bins
        slot = slot.reshape(-1)
        self.hist.view(-1).scatter_add_(0, slot, torch.ones_like(slot))

    def step(self, load):
        all_reduce(self.hist, self.world_size)
        tokens = self.hist[0].sum()                    # every token adds one margin to every expert
        # Su, part 6: beta_j = the (mk/n + 1)-th largest of s_:,j - alpha,
        # i.e. beta_j plus the level that mk/n of the margins exceed.
        quota = tokens.double() * self.top_k / self.n_experts
        beta = self.beta.lerp(self.beta + level_exceeded_by(self.hist, quota, self.span), 1 - self.cfg.beta_ema)
        # Megatron re-centres beta: a shift common to all experts changes no top-k.
        beta -= beta.mean()
        # A step with no training batch seen leaves beta alone (a tensor
        # condition, so a GPU never waits for the host here).
        self.beta.copy_(torch.where(tokens > 0, beta, self.beta))
        self.hist.zero_()


register("quantile", QuantileBalancing)
