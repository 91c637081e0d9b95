"""
Exercise 5: expert choice made causal (Zhou et al. 2022, Sec. 3; the leak:
Wang et al. 2024, Sec. 5.2).

Expert choice lets each expert take the C = n c / E tokens of its routing
group that score it highest. Whether token t makes the cut depends on how
every other token of the group scores it -- later tokens of t's own sequence
included -- so the output at position t depends on the future, and
train.causal_probe reads far from 0 (balancers.ExpertChoice).

The cut itself is just a number per expert: the score of the first token the
expert turns away. Learn that number from the *previous* batch and apply it
to each token on its own:

    expert i takes token t   iff   s_{i,t} > theta_i
    theta_i = expert choice's cut-off for expert i, averaged over the routing
              groups of the last global batch trained on

Then a token's routing depends only on its own scores and on batches already
trained on -- exactly what keeps lossfree causal (its bias also comes from
the past) -- and the probe reads 0. The price: the load is no longer exactly
C per expert, only close to it while the router changes slowly. A token may
still get zero or several experts, as in expert choice.

Write cutoffs(), route() and step(). Check with
`python -m pytest exercises -k ex5`, then train it next to expert_choice and
compare the causal leak and the validation loss:

    python -m exercises.run --balancer ex5_causal_ec
    python -m exercises.run --balancer expert_choice
"""

import torch

from balancers import Balancer, ExpertChoice, Routing, all_reduce, expert_capacity, gate_scores, groups_of, register


class CausalExpertChoice(Balancer):
    """`ex5_causal_ec`: every expert takes the tokens that score it above a
    threshold learnt from past batches."""
    paper = "Zhou et al. 2022, with thresholds from past batches"
    summary = "expert choice with per-expert thresholds from past batches: causal"
    token_choice = False            # a token gets 0..E experts; causality is checked by the probe
    knobs = dict(Balancer.knobs, capacity_factor=ExpertChoice.knobs["capacity_factor"],
                 route_seqs=ExpertChoice.knobs["route_seqs"])

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        # State kept across optimizer steps, saved in checkpoints. A softmax
        # or sigmoid score is at most 1, so before the first batch has been
        # seen no expert takes anything: the first step trains attention only.
        self.register_buffer("threshold", torch.ones(n_experts, dtype=torch.float32))
        # Scratch for the current optimizer step (back to zero after step()):
        # the sum of the cut-offs of every routing group seen, and their number.
        self.register_buffer("cut_sum", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("cut_groups", torch.zeros((), dtype=torch.long), persistent=False)

    def cutoffs(self, scores):
        """scores [B, T, E] -> [G, E]: per routing group of route_seqs
        sequences, the (C+1)-th largest score of each expert -- the first
        token expert choice would turn away. Strictly above it lie exactly
        the C tokens expert choice picks (ties aside)."""
        B, T, E = scores.shape
        G = groups_of(B, self.cfg.route_seqs, "route_seqs")
        n = self.cfg.route_seqs * T
        C = expert_capacity(n, self.cfg.capacity_factor, E)
        if C == n:                                      # the expert takes the whole group: no cut
            return scores.new_zeros(G, E)
        return scores.reshape(G, n, E).topk(C + 1, dim=1).values[:, C]

    def route(self, logits):
        B, T, E = logits.shape
        scores = gate_scores(logits, self.cfg.gate)
        if self.training:
            # Remember this batch's cut-offs for the *next* batch. Training
            # mode only: a validation batch must not move the thresholds.
            cut = self.cutoffs(scores.detach())
            self.cut_sum += cut.sum(0)
            self.cut_groups += cut.shape[0]
        # Each (token, expert) pair on its own: only the token's own score
        # and thresholds from past batches decide.
        flat = scores.reshape(B * T, E)
        token_idx, expert_idx = (flat.detach() > self.threshold).nonzero(as_tuple=True)
        weight = flat[token_idx, expert_idx]            # the raw score, as in expert choice
        probs = scores / scores.sum(-1, keepdim=True)
        return Routing(token_idx, expert_idx, weight, probs, logits)

    def step(self, load):
        # Every rank and micro-step contributed groups of the same size; the
        # mean over all of them does not depend on how the batch was cut up.
        all_reduce(self.cut_sum, self.world_size)
        all_reduce(self.cut_groups, self.world_size)
        if self.cut_groups > 0:
            self.threshold.copy_(self.cut_sum / self.cut_groups)
        self.cut_sum.zero_()
        self.cut_groups.zero_()


register("ex5_causal_ec", CausalExpertChoice)
