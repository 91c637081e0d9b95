"""
balancers.py -- the load-balancing strategies, side by side.

A Mixture-of-Experts layer has a router that scores every token against every
expert. Left alone, the router collapses onto a few experts: they get better
because they get more tokens, so they get more tokens. Each class below is one
answer from the literature to "how do we keep the load even?". They share one
small interface, so that reading the file top to bottom -- or diffing two
classes -- is reading the difference between the papers:

    route(logits) -> Routing   which (token, expert, weight) assignments to make
    loss(routing) -> Tensor    an extra loss added to the language-model loss
    step(load)                 called once per optimizer step with the exact
                               per-expert token counts of the whole global batch

  none           plain top-k, no balancing: the baseline that collapses
  aux            Switch/GShard auxiliary loss over small balance groups
  global_aux     the same loss with the counts taken over the global batch
                 (Qiu et al. 2025, "Demons in the Detail")
  lossfree       Loss-Free Balancing: an expert-wise bias that only steers the
                 top-k choice (Wang et al. 2024)
  seq_aux        lossfree plus a tiny per-sequence aux loss (DeepSeek-V3)
  expert_choice  each expert picks its top-C tokens (Zhou et al. 2022):
                 balanced by construction, but it peeks at future tokens

Every strategy returns the same representation, a flat list of assignments
`token_idx[A], expert_idx[A], weight[A]`; moe.py dispatches those to the
experts without knowing which strategy made them.

To add a strategy: write one class with route/loss/step and add one line to
BALANCERS at the bottom of this file.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class BalanceConfig:
    """The strategies' knobs. `None` means "the strategy's own default"."""
    gate: str | None = None        # "softmax" or "sigmoid"; None: the paper's choice
    alpha: float | None = None     # aux-loss coefficient (aux/global_aux 1e-2, seq_aux 1e-4)
    balance_seqs: int = 2          # aux: sequences per balance group (Qiu et al.'s "balance batch")
    bias_rate: float = 1e-3        # lossfree: u, the bias update rate (Wang et al. Sec. 3)
    capacity_factor: float = 2.0   # expert_choice: c in C = n * c / E (Zhou et al. Sec. 3.1)
    route_seqs: int = 2            # expert_choice: sequences per routing group
    route_shuffle: bool = False    # expert_choice: fill routing groups with tokens shuffled across
                                   # the micro-batch (Wang et al. Fig. 9's control for the leak)
    z_loss: float = 0.0            # router z-loss coefficient, any strategy (ST-MoE uses 1e-3)


@dataclass
class Routing:
    """What a strategy decided for one layer and one batch of B x T tokens."""
    token_idx: torch.Tensor    # [A] long: row in the flattened [B*T] tokens
    expert_idx: torch.Tensor   # [A] long: which expert gets that row
    weight: torch.Tensor       # [A] gate value that scales the expert output (has grad)
    probs: torch.Tensor        # [B, T, E] gate scores normalised to sum 1 per token (the aux loss's P)
    logits: torch.Tensor       # [B, T, E] raw router logits (for the z-loss)


# ----------------------------------------------------------------------------
# Shared pieces: the gate, token-choice top-k, and the Switch loss formula.

def gate_scores(logits, gate):
    """s_{i,t} = G(u_t . e_i). Softmax makes experts compete for a token;
    sigmoid scores each expert independently (Wang et al. found it better)."""
    if gate == "softmax":
        return logits.softmax(dim=-1)
    if gate == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unknown gate {gate!r}: use 'softmax' or 'sigmoid'")


def top_k_routing(logits, scores, k, choice_bias=None):
    """Token choice: every token picks its k best experts.

    `choice_bias` (lossfree) is added only to decide *which* experts win; the
    weights are always the unbiased scores, so the bias never enters the
    forward value and therefore gets no gradient (Wang et al. Eq. 3)."""
    B, T, E = scores.shape
    choice = scores.detach() if choice_bias is None else scores.detach() + choice_bias
    expert_idx = choice.topk(k, dim=-1).indices                  # [B, T, k]
    weight = scores.gather(-1, expert_idx)                       # unbiased s_{i,t}
    token_idx = torch.arange(B * T, device=scores.device).repeat_interleave(k)
    probs = scores / scores.sum(-1, keepdim=True)                # no-op for softmax
    return Routing(token_idx, expert_idx.reshape(-1), weight.reshape(-1), probs, logits)


def counts_per_group(routing, group_tokens, n_experts):
    """Exact integer count of assignments per (group, expert): shape [G, E].
    Integers on purpose: a low-precision count can flip the sign of a small
    difference (one shipped lossfree implementation did exactly that)."""
    n_groups = routing.probs.shape[0] * routing.probs.shape[1] // group_tokens
    group = routing.token_idx // group_tokens
    flat = torch.bincount(group * n_experts + routing.expert_idx, minlength=n_groups * n_experts)
    return flat.view(n_groups, n_experts)


def switch_loss(counts, probs):
    """N_E * sum_i f_i * P_i per group (Fedus et al. 2021, Sec. 2.2), averaged
    over groups. counts [G, E]; probs [G, n, E]. f is a count, P carries the
    gradient. f is normalised by k*T so it sums to 1, which makes a uniform
    router (P_i = 1/E) score exactly 1, whatever f is."""
    n_experts = probs.shape[-1]
    f = counts.float() / counts.sum(-1, keepdim=True).clamp(min=1)   # [G, E]
    P = probs.mean(dim=1)                                             # [G, E]
    return n_experts * (f * P).sum(-1).mean()


def router_z_loss(logits):
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2. It keeps router
    logits small, which matters for numerical stability in low precision."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def all_reduce_sum(t, world_size):
    """Sum an integer count vector over ranks, in place (and outside autograd:
    a functional all_reduce whose result is dropped silently reduces nothing,
    turning global-batch balancing back into micro-batch balancing)."""
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------
# The strategies.

class Balancer(nn.Module):
    """The interface and the do-nothing defaults. One instance per MoE layer,
    so buffers hold that layer's state."""
    default_gate = "softmax"

    def __init__(self, n_experts, top_k, cfg, world_size=1):
        super().__init__()
        self.n_experts, self.top_k, self.cfg, self.world_size = n_experts, top_k, cfg, world_size
        self.gate = cfg.gate or self.default_gate

    def route(self, logits):
        return top_k_routing(logits, gate_scores(logits, self.gate), self.top_k)

    def loss(self, routing):
        return routing.logits.new_zeros(())

    def step(self, load):
        pass


class NoBalancing(Balancer):
    """`none`: plain top-k over softmax scores. Nothing stops the rich-get-richer
    loop, so MaxVio typically climbs and some experts starve: the baseline."""


class AuxLoss(Balancer):
    """`aux`: the auxiliary load-balancing loss (Fedus et al. 2021, Sec. 2.2;
    Lepikhin et al. 2020).

        LBL = alpha * N_E * sum_i f_i * P_i,  alpha = 1e-2 (Switch)

    computed per layer over *balance groups* of `balance_seqs` sequences and
    averaged over groups. In a large run the group is the micro-batch of one
    device; here it is a fixed number of sequences, so the result does not
    depend on how a global batch is split over processes. With few sequences
    per group the loss asks every sequence to spread evenly over experts, which
    is what Qiu et al. 2025 show blocks domain specialisation."""

    def route(self, logits):
        B = logits.shape[0]
        if B % self.cfg.balance_seqs:
            raise ValueError(f"balance_seqs={self.cfg.balance_seqs} does not divide the local "
                             f"batch of {B} sequences: choose a divisor of the micro-batch")
        return super().route(logits)

    def loss(self, routing):
        B, T, E = routing.probs.shape
        group_tokens = self.cfg.balance_seqs * T
        counts = counts_per_group(routing, group_tokens, E)
        alpha = 1e-2 if self.cfg.alpha is None else self.cfg.alpha
        return alpha * switch_loss(counts, routing.probs.reshape(-1, group_tokens, E))


class GlobalAuxLoss(Balancer):
    """`global_aux`: the global-batch auxiliary loss (Qiu et al. 2025, Eq. 5 and
    Algorithm 1).

        LBL_global = alpha * N_E * sum_i fbar_i * P_i^j

    Same formula, but fbar counts the selections of the *whole global batch*:
    one all-reduce of N_E integers per layer brings in every rank's counts, and
    a buffer adds up the micro-steps of gradient accumulation seen so far (so
    at the last micro-step f is exactly the global batch's). P stays local to
    the rank; averaging gradients over ranks then gives (1/N_P) sum_j, i.e. the
    loss does not shrink as ranks are added. The buffer is reset by step().
    A code sequence may now use "code experts" as long as the batch as a whole
    is balanced."""

    def __init__(self, n_experts, top_k, cfg, world_size=1):
        super().__init__(n_experts, top_k, cfg, world_size)
        self.register_buffer("seen", torch.zeros(n_experts, dtype=torch.long), persistent=False)

    def loss(self, routing):
        E = self.n_experts
        counts = torch.bincount(routing.expert_idx, minlength=E)
        if self.training:  # evaluation must not pollute the training buffer
            self.seen += all_reduce_sum(counts, self.world_size)
            counts = self.seen
        alpha = 1e-2 if self.cfg.alpha is None else self.cfg.alpha
        return alpha * switch_loss(counts[None], routing.probs.reshape(1, -1, E))

    def step(self, load):
        self.seen.zero_()


class LossFree(Balancer):
    """`lossfree`: Loss-Free Balancing (Wang et al. 2024, Algorithm 1).

    No loss at all. Each expert has a bias b_i that is added to its score only
    to choose the top-k; the gate weight stays the unbiased sigmoid score, so
    the LM gradient is not disturbed. After every optimizer step the bias moves
    against the load just observed over the whole global batch:

        e_i = mean(c) - c_i,   b_i += u * sign(e_i),   u = 1e-3

    Using the *previous* batch's load is what keeps it causal: the current
    batch's load would depend on future tokens. The bias is an fp32 buffer:
    state saved in checkpoints, never a parameter, never given gradient."""
    default_gate = "sigmoid"

    def __init__(self, n_experts, top_k, cfg, world_size=1):
        super().__init__(n_experts, top_k, cfg, world_size)
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))

    def route(self, logits):
        return top_k_routing(logits, gate_scores(logits, self.gate), self.top_k, self.bias)

    def step(self, load):
        error = load.float().mean() - load.float()          # > 0: underloaded
        self.bias += self.cfg.bias_rate * torch.sign(error)


class SeqAuxLossFree(LossFree):
    """`seq_aux`: DeepSeek-V3's recipe (DeepSeek-AI 2024, Sec. 2.1.2): lossfree
    routing plus a tiny auxiliary loss computed *within each sequence*
    (alpha = 1e-4), only to prevent extreme imbalance inside one sequence."""

    def loss(self, routing):
        B, T, E = routing.probs.shape
        counts = counts_per_group(routing, T, E)
        alpha = 1e-4 if self.cfg.alpha is None else self.cfg.alpha
        return alpha * switch_loss(counts, routing.probs)


class ExpertChoice(Balancer):
    """`expert_choice`: Expert Choice routing (Zhou et al. 2022, Sec. 3.1).

    The roles flip: S = softmax(X W_g) over experts, and each *expert* takes the
    C tokens of its routing group that score it highest, C = n * c / E with
    capacity factor c = 2. Every expert gets exactly C tokens -- perfect balance,
    no loss -- and a token may get zero or several experts.

    The catch (Wang et al. 2024, Sec. 2.3 and App. C): whether token t is picked
    depends on how every other token of the group scores, later tokens of its
    own sequence included. The output at position t therefore depends on the
    future, which a causal language model must never see. The smaller the
    routing group (`route_seqs` sequences), the more a single choice reveals."""

    def route(self, logits):
        B, T, E = logits.shape
        g = self.cfg.route_seqs
        if B % g:
            raise ValueError(f"route_seqs={g} does not divide the local batch of {B} "
                             f"sequences: choose a divisor of the micro-batch")
        scores = gate_scores(logits, self.gate).reshape(B * T, E)
        # Which token sits in which group. Normally group j is sequences
        # [j*g, (j+1)*g). With route_shuffle a fixed permutation scatters every
        # sequence over all groups, so a group holds few tokens of any one
        # sequence and a choice reveals little about that sequence's future.
        slot = torch.arange(B * T, device=logits.device)
        if self.cfg.route_shuffle:
            slot = slot[torch.randperm(B * T, generator=torch.Generator().manual_seed(0)).to(slot.device)]
        n = g * T                                                   # tokens per routing group
        C = expert_capacity(n, self.cfg.capacity_factor, E)
        top = scores[slot].view(B // g, n, E).topk(C, dim=1)       # each expert's best C tokens
        offset = torch.arange(B // g, device=logits.device)[:, None, None] * n
        token_idx = slot[(top.indices + offset).transpose(1, 2)]   # [groups, E, C]
        expert_idx = torch.arange(E, device=logits.device)[None, :, None].expand_as(token_idx)
        weight = top.values.transpose(1, 2)
        probs = (scores / scores.sum(-1, keepdim=True)).view(B, T, E)
        return Routing(token_idx.reshape(-1), expert_idx.reshape(-1), weight.reshape(-1), probs, logits)


def expert_capacity(n_tokens, capacity_factor, n_experts):
    """C = n * c / E tokens per expert (Zhou et al. 2022, Eq. 1), at least 1 and
    at most the whole group."""
    return max(1, min(n_tokens, round(n_tokens * capacity_factor / n_experts)))


# ----------------------------------------------------------------------------
# Registration: one line per strategy.

BALANCERS = {
    "none": NoBalancing,
    "aux": AuxLoss,
    "global_aux": GlobalAuxLoss,
    "lossfree": LossFree,
    "seq_aux": SeqAuxLossFree,
    "expert_choice": ExpertChoice,
}


def make_balancer(name, n_experts, top_k, cfg, world_size=1):
    """Build the named strategy, checking the settings a newcomer gets wrong."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}: choose one of {', '.join(BALANCERS)}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}: lower --top-k")
    if cfg.capacity_factor <= 0:
        raise ValueError(f"capacity_factor={cfg.capacity_factor} must be > 0: try 2.0")
    if cfg.gate not in (None, "softmax", "sigmoid"):
        raise ValueError(f"unknown gate {cfg.gate!r}: use 'softmax' or 'sigmoid'")
    for knob in ("balance_seqs", "route_seqs"):
        if getattr(cfg, knob) < 1:
            raise ValueError(f"{knob}={getattr(cfg, knob)} must be >= 1 sequence")
    return BALANCERS[name](n_experts, top_k, cfg, world_size)
