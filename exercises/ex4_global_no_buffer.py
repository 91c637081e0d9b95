"""
Exercise 4: global-batch balancing without the accumulation buffer
(Qiu et al. 2025, Eq. 5 and Algorithm 1).

The global-batch aux loss counts f over the whole global batch:

    LBL_global = alpha * N_E * sum_i fbar_i * P_i,   fbar from every rank's counts

With several processes, one all-reduce of the N_E counts per layer makes f
global across ranks. With gradient accumulation there is a second split: the
global batch arrives as micro-steps, and the loss of micro-step 1 must be
computed before micro-step 2 even exists. The *exact* global-batch loss would
need all micro-steps' counts first. Qiu et al.'s Algorithm 1 approximates it
with a buffer: each micro-step adds its counts to the ones seen so far in
this optimizer step (balancers.GlobalAuxLoss, `seen`), so at the last
micro-step f is exactly the global batch's.

This exercise leaves the buffer out: f is synchronised across ranks but not
across micro-steps. With --grad-accum 1 that is exactly global_aux. With
--grad-accum A the balance batch shrinks to one micro-batch (of every rank),
so the same global batch is balanced differently depending on how it is
cut -- see for yourself:

    python -m exercises.run --balancer ex4_global_aux_nobuf --grad-accum 4 --domain-block 4

Write loss(). Check with `python -m pytest exercises -k ex4`.
"""

import torch  # noqa: F401

from balancers import ALPHA, Balancer, all_reduce, register  # noqa: F401


class GlobalAuxNoBuffer(Balancer):
    """`ex4_global_aux_nobuf`: the aux loss with f all-reduced over ranks, but
    started afresh at every micro-step."""
    paper = "Qiu et al. 2025, Eq. 5 without Algorithm 1's buffer"
    summary = "aux loss with f counted over all ranks of one micro-step"
    # alpha per MoE layer, as in Switch and Qiu et al.: the model adds every layer's loss (GPT.forward)
    knobs = dict(Balancer.knobs, alpha=ALPHA)
    accum_invariant = False     # the balance batch is a micro-step: cutting the global batch changes it

    def loss(self, routing):
        """Routing -> alpha * N_E * sum_i f_i * P_i for this micro-step.

        f_i: the share of expert i among the assignments of this micro-step
        on *every* rank (k per token, so f sums to 1). Count with
        torch.bincount, then all_reduce(counts, self.world_size) (balancers.py:
        in place, a no-op on one process) -- in training mode only.
        P_i: the mean of routing.probs[..., i] over this rank's tokens.
        No buffer: nothing from an earlier micro-step may enter."""
        raise NotImplementedError("exercise 4: write GlobalAuxNoBuffer.loss()")


register("ex4_global_aux_nobuf", GlobalAuxNoBuffer)
