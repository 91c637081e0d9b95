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

from balancers import Balancer, ExpertChoice, Routing, all_reduce, expert_capacity, gate_scores, groups_of, register  # noqa: F401


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
        """scores [B, T, E] -> [G, E]: for each routing group of
        self.cfg.route_seqs sequences (G = B / route_seqs; balancers.groups_of
        checks it divides) and each expert, the score of the first token
        expert choice would turn away: the (C+1)-th largest score of that
        expert in the group, C = expert_capacity(n, capacity_factor, E) with n
        tokens per group. Strictly above it lie exactly expert choice's C
        picks. If C == n nothing is turned away: return 0."""
        raise NotImplementedError("exercise 5: write CausalExpertChoice.cutoffs()")

    def route(self, logits):
        """logits [B, T, E] -> Routing: expert i takes token t iff
        s_{i,t} > self.threshold[i] (s = gate_scores(logits, self.cfg.gate)),
        with the raw score s_{i,t} as weight; token_idx indexes the flattened
        B*T tokens. In training mode, also add this batch's cut-offs to the
        scratch buffers (cut_sum, cut_groups) -- for the *next* batch: the
        threshold itself changes only in step()."""
        raise NotImplementedError("exercise 5: write CausalExpertChoice.route()")

    def step(self, load):
        """Once per optimizer step (`load` is not needed here): the new
        threshold is the mean cut-off over every routing group of the step --
        all micro-steps, all ranks (all_reduce(t, self.world_size), in place)
        -- and the scratch buffers go back to zero."""
        raise NotImplementedError("exercise 5: write CausalExpertChoice.step()")


register("ex5_causal_ec", CausalExpertChoice)
