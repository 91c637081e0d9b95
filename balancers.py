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
    state() -> {name: tensor}  the buffers it keeps (lossfree's bias), which
                               the training loop logs, saves and checks

  none           plain top-k, no balancing: the baseline that collapses
  lossfree       Loss-Free Balancing: an expert-wise bias that only steers the
                 top-k choice (Wang et al. 2024), the default
  aux            Switch/GShard auxiliary loss over small balance groups
  global_aux     the same loss with the counts taken over the global batch
                 (Qiu et al. 2025, "Demons in the Detail")
  seq_aux        lossfree plus a tiny per-sequence aux loss (DeepSeek-V3)
  expert_choice  each expert picks its top-C tokens (Zhou et al. 2022):
                 balanced by construction, but it peeks at future tokens

Every strategy returns the same representation, a flat list of assignments
`token_idx[A], expert_idx[A], weight[A]`; moe.py dispatches those to the
experts without knowing which strategy made them.

To add a strategy: write one class (its settings as `knobs`, its state as
registered buffers) and add one line to BALANCERS at the bottom of this file,
or call `register("name", Class)` from a file of your own and pass
`--import FILE` (docs/adding-a-strategy.md). The command line, the
comparison, the benchmarks and the tests find it there.
"""

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from plumbing.knobs import (all_knobs, check_registration, check_settings, check_strategy,  # noqa: F401
                            import_strategies, knob_flag, name_of)

@dataclass(frozen=True)
class Knob:
    """One setting of a strategy, declared on its class: the value it takes
    unless told otherwise, what it means, and the values it may take (a number
    in the range low..high, each end open or closed; one of `choices`; or a
    number of sequences that must divide each process's micro-batch). Each
    becomes a checked --flag of train.py and the comparison; the checks and
    the flags are at the end of this file."""
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False      # True: low itself is not allowed
    open_high: bool = False
    choices: tuple = ()
    divides_batch: bool = False

    def but(self, **changes):
        """The same knob with something changed (usually its default)."""
        return replace(self, **changes)


@dataclass
class Routing:
    """What a strategy decided for one layer and one batch of B x T tokens."""
    token_idx: torch.Tensor    # [A] long: row in the flattened [B*T] tokens
    expert_idx: torch.Tensor   # [A] long: which expert gets that row
    weight: torch.Tensor       # [A] gate value that scales the expert output (has grad)
    probs: torch.Tensor        # [B, T, E] gate scores normalised to sum 1 per token: s / sum_j s_j, the P of
                               # DeepSeek-V3's sequence-wise loss (Eqs. 19-20); equal to s itself for softmax
    logits: torch.Tensor       # [B, T, E] raw router logits (for the z-loss)
    dropped: object = 0        # assignments cut by --expert-capacity (a count); 0 when dropless


# ----------------------------------------------------------------------------
# Shared pieces: the gate, token-choice top-k, exact counts, the z-loss.

def gate_scores(logits, gate):
    """s_{i,t} = G(u_t . e_i). Softmax makes experts compete for a token;
    sigmoid scores each expert independently (Wang et al. found it better)."""
    if gate == "softmax":
        return logits.softmax(dim=-1)
    if gate == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unknown gate {gate!r}: use 'softmax' or 'sigmoid'")


def top_k_routing(logits, scores, k, choice_bias=None, n_groups=1, topk_groups=0, expert_capacity=0.0,
                  drop_policy="probs"):
    """Token choice: every token picks its k best experts.

    `choice_bias` (lossfree) is added only to decide *which* experts win; the
    weights are always the unbiased scores, so the bias never enters the
    forward value and therefore gets no gradient (Wang et al. Eq. 3). The
    options (TOKEN_CHOICE_KNOBS): expert groups (limit_to_groups), capacity (drop_over_capacity)."""
    B, T, E = scores.shape
    choice = scores.detach() if choice_bias is None else scores.detach() + choice_bias
    if n_groups > 1:
        choice = limit_to_groups(choice, k, n_groups, topk_groups)
    expert_idx = choice.topk(k, dim=-1).indices                  # [B, T, k]
    weight = scores.gather(-1, expert_idx)                       # unbiased s_{i,t}
    token_idx = torch.arange(B * T, device=scores.device).repeat_interleave(k)
    probs = scores / scores.sum(-1, keepdim=True)                # no-op for softmax
    routing = Routing(token_idx, expert_idx.reshape(-1), weight.reshape(-1), probs, logits)
    return drop_over_capacity(routing, expert_capacity, drop_policy, E) if expert_capacity > 0 else routing


def check_groups(n_experts, top_k, n_groups, topk_groups):
    """The groups kept per token (topk_groups 0: all); a ValueError naming the flags if they do not fit."""
    if n_experts % n_groups:
        raise ValueError(f"--n-groups {n_groups} must divide the {n_experts} experts (--n-experts)")
    kept = topk_groups or n_groups
    if kept > n_groups or top_k > kept * (n_experts // n_groups):
        raise ValueError(f"--topk-groups {kept} of --n-groups {n_groups} must be at most n_groups and leave "
                         f"at least --top-k {top_k} experts ({n_experts // n_groups} per group)")
    return kept


def limit_to_groups(choice, k, n_groups, topk_groups):
    """DeepSeek-V3 group-limited routing (Sec. 2.1.2, official Gate code): each token keeps the
    topk_groups of n_groups equal expert groups whose two best choice scores sum highest."""
    B, T, E = choice.shape
    kept = check_groups(E, k, n_groups, topk_groups)
    grouped = choice.view(B, T, n_groups, E // n_groups)
    # V3 Gate: a group's score is the sum of its top-2 (biased) scores; a group of one expert has only one
    group_score = grouped.topk(min(2, E // n_groups), dim=-1).values.sum(-1)        # [B, T, G]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, group_score.topk(kept, dim=-1).indices, True)
    # -inf, not 0.0 (as the Hugging Face port masks): biased scores s + b can be negative, and a
    # dropped group filled with 0.0 would then outscore every expert of the groups the token kept
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(B, T, E)


def drop_over_capacity(routing, capacity, policy, n_experts):
    """GShard/Switch capacity (Megatron's expert capacity and drop policy): each expert keeps at
    most C of this call's N*k assignments (one micro-batch of one process, as Megatron), its
    highest-scoring ("probs") or earliest ("position"); the rest are dropped, the residual
    carries the token, and moe.MoELayer.combine sums the fewer rows with index_add_.
    Not causal: the batch's other tokens decide what is dropped (by probs, later ones of the
    same sequence). Exercise 3 builds the causal variant by hand: per sequence, in token order."""
    A = routing.expert_idx.numel()                                                # N * k
    # Switch Sec. 2.2 and Megatron: C = ceil(capacity factor * tokens * k / E), an expert's even share scaled
    C = math.ceil(capacity * A / n_experts)
    # Megatron's drop policies: the priority within each expert is the score or the position;
    # the stable sorts break ties by token order, so equal scores drop the later token.
    order = torch.arange(A, device=routing.expert_idx.device)
    if policy == "probs":
        order = torch.argsort(routing.weight.detach(), descending=True, stable=True)
    order = order[torch.argsort(routing.expert_idx[order], stable=True)]         # grouped by expert
    counts = count_per_expert(routing.expert_idx, n_experts)
    first = counts.cumsum(0) - counts                                             # each expert's first slot
    rank = torch.empty_like(order)
    rank[order] = torch.arange(A, device=order.device) - first[routing.expert_idx[order]]
    keep = rank < C
    return replace(routing, token_idx=routing.token_idx[keep], expert_idx=routing.expert_idx[keep],
                   weight=routing.weight[keep], dropped=int(A - keep.sum()))


def count_per_expert(expert_idx, n_experts):
    """How many assignments each expert got: [n_experts] integers, what
    torch.bincount(expert_idx, minlength=n_experts) gives.

    bincount sizes its output by the largest index, so on a GPU it first
    copies that index to the host: the CPU stops queueing kernels until the
    GPU has caught up, once per call. Here the size is known in advance: a
    one per assignment is added into a fixed row of zeros, on the device.
    (Integer adds, so the order they land in changes nothing.)"""
    counts = torch.zeros(n_experts, dtype=torch.long, device=expert_idx.device)
    return counts.scatter_add_(0, expert_idx, torch.ones_like(expert_idx))


def router_z_loss(logits):
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2. It keeps router
    logits small, which matters for numerical stability in low precision."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def all_reduce(t, world_size, op="sum"):
    """Sum (or max) a tensor over ranks, in place, and return it; a no-op for
    one process. In place and outside autograd on purpose: a functional
    all_reduce whose result is dropped silently reduces nothing, and one
    shipped global-batch balancer became a micro-batch balancer that way."""
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------
# The interface every strategy fills in.
#
# Each class says what it is (`paper`, `summary`), which knobs it reads
# (`knobs`: name -> Knob, with the default and the range), and whether it is
# token choice (`token_choice`: exactly causal, which the tests check, unless
# --expert-capacity drops). Everything that lists strategies -- the CLI, the comparison,
# the benchmarks, the tests -- reads these attributes from BALANCERS at the
# bottom of the file. The knobs more than one strategy reads:

GATE = Knob("softmax", "router gate G in s = G(u . e)", choices=("softmax", "sigmoid"))
Z_LOSS = Knob(0.0, "router z-loss coefficient (ST-MoE: 1e-3)", low=0, high=1)
# per MoE layer: GPT.forward adds every layer's loss, each with the full alpha (Switch Sec. 2.2)
ALPHA = Knob(1e-2, "aux-loss coefficient, per MoE layer (Switch: 1e-2)", low=0, high=1)
# The options of top_k_routing, merged into the knobs of the strategies that route by it and
# only those: expert choice and threshold would ignore them, and an ignored knob lies.
TOKEN_CHOICE_KNOBS = dict(
    n_groups=Knob(1, "expert groups for group-limited routing (DeepSeek-V3 Sec. 2.1.2: 8); 1 is off", low=1),
    topk_groups=Knob(0, "groups each token may use, by the sum of each group's top-2 choice scores "
                        "(DeepSeek-V3: 4 of 8); 0 means all --n-groups", low=0),
    expert_capacity=Knob(0.0, "capacity factor: each expert keeps at most ceil(c N k / E) of a micro-batch's "
                              "N k assignments, the rest are dropped (GShard, Switch; Megatron "
                              "--moe-expert-capacity-factor); 0 is dropless", low=0),
    drop_policy=Knob("probs", "which assignments an expert over capacity keeps: its highest scores or its "
                              "earliest tokens (Megatron --moe-token-drop-policy)", choices=("probs", "position")))


def token_choice_options(cfg):
    """The TOKEN_CHOICE_KNOBS a strategy's settings hold, as top_k_routing's keywords."""
    return {name: value for name, value in vars(cfg).items() if name in TOKEN_CHOICE_KNOBS}


class Balancer(nn.Module):
    """The interface and the do-nothing defaults. One instance per MoE layer,
    so buffers hold that layer's state.

        forward(logits) -> (routing, loss)   route, then the strategy's loss
                                             plus the optional router z-loss
        route(logits) -> Routing             which (token, expert, weight)
        loss(routing) -> Tensor              the strategy's extra loss
        step(load)                           once per optimizer step, with the
                                             global batch's exact counts
        state() -> {name: tensor}            what to log, plot, checkpoint
                                             and compare across ranks
    """
    paper = "-"
    summary = "plain top-k"
    token_choice = True
    # Each token gets exactly top_k assignments, listed token by token (fewer
    # only where some were dropped): the MoE layer then sums each token's k
    # rows in a fixed order (moe.MoELayer.combine).
    fixed_k = True
    accum_invariant = True      # same training whether a global batch is one micro-step or several
    knobs = dict(gate=GATE, z_loss=Z_LOSS)

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__()
        self.n_experts, self.top_k, self.world_size = n_experts, top_k, world_size
        # The value in effect of every knob the class declares: self.cfg.gate, ...
        self.cfg = SimpleNamespace(**settings(type(self), knobs or {}))
        if "n_groups" in self.knobs:   # refuse groups that do not fit before the first batch
            check_groups(n_experts, top_k, self.cfg.n_groups, self.cfg.topk_groups)

    # -- the interface ----------------------------------------------------------

    def forward(self, logits):
        routing = self.route(logits)
        loss = self.loss(routing)
        if self.cfg.z_loss:
            loss = loss + self.cfg.z_loss * router_z_loss(logits)
        return routing, loss

    def route(self, logits):
        return top_k_routing(logits, gate_scores(logits, self.cfg.gate), self.top_k,
                             **token_choice_options(self.cfg))

    def loss(self, routing):
        return routing.logits.new_zeros(())

    def step(self, load):
        pass

    def state(self):
        """Every buffer the strategy keeps across optimizer steps: logged,
        written to summary.json, compared across ranks and saved in checkpoints
        (a buffer registered with persistent=False is scratch space and must be
        back to zero after step(); the tests hold every strategy to that)."""
        return dict(self.state_dict())


class NoBalancing(Balancer):
    """`none`: plain top-k over softmax scores. Nothing stops the rich-get-richer
    loop, so MaxVio typically climbs and some experts starve: the baseline."""
    summary = "plain top-k, no balancing: the baseline that collapses"
    knobs = dict(Balancer.knobs, **TOKEN_CHOICE_KNOBS)


# ----------------------------------------------------------------------------
# Loss-Free Balancing: steer the choice with a bias, add no loss.

class LossFree(Balancer):
    """`lossfree`: Loss-Free Balancing (Wang et al. 2024, Algorithm 1).

    No loss at all. Each expert has a bias b_i that is added to its score only
    to choose the top-k; the gate weight stays the unbiased sigmoid score, so
    the LM gradient is not disturbed. After every optimizer step the bias moves
    against the load just observed over the whole global batch:

        e_i = mean(c) - c_i,   b_i += u * sign(e_i),   u = 1e-3

    (or, with bias_update="proportional", b_i += u * e_i / mean(c): their
    Sec. 4.3 (Table 3) tries u * e_i with the sigmoid gate, and App. C.2
    uses it with the softmax gate. Dividing e_i by the mean load is this
    project's choice: it makes u mean the same at any batch size, so u here
    is not numerically their u). Using the *previous* batch's
    load is what keeps it causal: the current batch's load would depend on
    future tokens. The bias is an fp32 buffer: state saved in checkpoints,
    never a parameter, never given gradient."""
    paper = "Wang et al. 2024, \"Auxiliary-Loss-Free Load Balancing\""
    summary = "an expert-wise bias that only steers the top-k choice, no loss"
    knobs = dict(Balancer.knobs, **TOKEN_CHOICE_KNOBS, gate=GATE.but(default="sigmoid"),
                 bias_rate=Knob(1e-3, "bias update rate u (Wang et al. Alg. 1)", low=0, high=1),
                 bias_update=Knob("sign", "sign: b += u sign(e) (Alg. 1); proportional: b += u e / mean(load) "
                                          "(their Table 3 and App. C.2 use u e; the / mean(load) is this "
                                          "project's)", choices=("sign", "proportional")))

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))

    def route(self, logits):
        return top_k_routing(logits, gate_scores(logits, self.cfg.gate), self.top_k, self.bias,
                             **token_choice_options(self.cfg))

    def step(self, load):
        load = load.float()
        # Alg. 1: e_i = mean(c) - c_i, the load error, positive for an underloaded expert.
        error = load.mean() - load
        if self.cfg.bias_update == "sign":
            # Alg. 1: b_i += u * sign(e_i)
            self.bias += self.cfg.bias_rate * torch.sign(error)
        else:
            # Sec. 4.3: b_i += u * e_i; over the mean load here, so that u does not depend on the batch size
            self.bias += self.cfg.bias_rate * error / load.mean().clamp(min=1)


# ----------------------------------------------------------------------------
# Auxiliary losses: the Switch formula over balance groups, the global batch,
# or one sequence.

def switch_loss(counts, scores):
    """N_E * sum_i f_i * P_i per group (Fedus et al. 2021, Sec. 2.2), averaged
    over groups. counts [G, E]; scores [G, n, E], the per-token scores whose
    mean is P. f is a count, P carries the gradient. f is normalised by k*T so
    it sums to 1, which makes a uniform softmax router (P_i = 1/E) score
    exactly 1, whatever f is."""
    n_experts = scores.shape[-1]
    f = counts.float() / counts.sum(-1, keepdim=True).clamp(min=1)   # [G, E]
    P = scores.mean(dim=1)                                            # [G, E]
    return n_experts * (f * P).sum(-1).mean()


def counts_per_group(routing, group_tokens, n_experts, position=None):
    """Exact integer count of assignments per (group, expert): shape [G, E].
    Integers on purpose: a low-precision count can flip the sign of a small
    difference (one shipped lossfree implementation did exactly that).
    `position[t]`: where token t sits in the order that is cut into groups
    (default: the tokens' own order, so a group is whole sequences)."""
    n_groups = routing.probs.shape[0] * routing.probs.shape[1] // group_tokens
    slot = routing.token_idx if position is None else position[routing.token_idx]
    group = slot // group_tokens
    flat = count_per_expert(group * n_experts + routing.expert_idx, n_groups * n_experts)
    return flat.view(n_groups, n_experts)


def groups_of(n_seqs, group_seqs, flag):
    """How many groups of `group_seqs` sequences the local batch makes. A group
    that straddles two micro-batches cannot be formed: refuse, naming the flag,
    rather than silently use a smaller group."""
    if n_seqs % group_seqs:
        raise ValueError(f"--{flag.replace('_', '-')} {group_seqs} must divide the {n_seqs} sequences "
                         f"each process sees per micro-step")
    return n_seqs // group_seqs


def fresh_permutation(n, steps_done, draw, training, device):
    """A permutation of n tokens that is new for every optimizer step and every
    call within it, and never one that training used when evaluating. Seeded
    by (steps done, training or evaluation, draw) so that a resumed run draws
    exactly what an uninterrupted one would. One fixed permutation for every
    call would make a shuffled model's evaluation its training regime."""
    seed = ((int(steps_done) * 2 + (0 if training else 1)) << 20) + draw
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


class RegroupsTokens(Balancer):
    """A strategy that may regroup tokens at random (aux's balance_shuffle,
    expert choice's route_shuffle). It counts optimizer steps (state, saved
    with the checkpoint) and the draws made since the last one, separately
    for training and evaluation, so evaluating never changes what training
    draws next."""

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.draws = {True: 0, False: 0}

    def permutation(self, n, device):
        draw = self.draws[self.training]
        self.draws[self.training] += 1
        return fresh_permutation(n, self.steps_done, draw, self.training, device)

    def step(self, load):
        self.steps_done += 1
        self.draws = {True: 0, False: 0}


def own_scores(routing, gate):
    """The gate's own scores s_{i,t} = G(u_t . e_i), whose mean is the aux
    loss's P (Wang et al. 2024, Eq. 2: P_i = (1/T) sum_t s_{i,t})."""
    return gate_scores(routing.logits, gate)


class AuxLoss(RegroupsTokens):
    """`aux`: the auxiliary load-balancing loss (Fedus et al. 2021, Sec. 2.2;
    Lepikhin et al. 2020).

        LBL = alpha * N_E * sum_i f_i * P_i,  alpha = 1e-2 (Switch)

    computed per layer over *balance groups* of `balance_seqs` sequences and
    averaged over groups; GPT.forward adds every layer's loss, each with the
    full alpha (Switch Sec. 2.2). P_i is the mean of the gate's own scores
    s_{i,t}: the softmax probabilities, or under the sigmoid gate the raw
    sigmoid scores of Wang et al. 2024, Eq. 2 (not renormalised per token).
    In a large run the group is the micro-batch of one device; here it is a
    fixed number of sequences, so the result does not
    depend on how a global batch is split over processes. With few sequences
    per group the loss asks every sequence to spread evenly over experts, which
    is what Qiu et al. 2025 show blocks domain specialisation.

    balance_shuffle is Qiu et al.'s control (Table 2, Shuffle LBL_micro): each
    group's f counts as many tokens as before, but drawn at random from the
    whole micro-batch (a fresh draw every step), so it has the diversity of
    the larger batch and the token count of the small group. P stays the
    group's own: Qiu's Sec. 5 names only "the expert selection frequency" as
    computed on the random tokens."""
    paper = "Fedus et al. 2021 (Switch), Lepikhin et al. 2020 (GShard)"
    summary = "aux loss alpha * E * sum_i f_i P_i over balance groups"
    knobs = dict(Balancer.knobs, **TOKEN_CHOICE_KNOBS, alpha=ALPHA,
                 balance_seqs=Knob(2, "sequences per balance group (Qiu et al.'s balance batch)", low=1,
                                   divides_batch=True),
                 balance_shuffle=Knob(False, "fill each balance group with --balance-seqs sequences' worth of "
                                             "tokens drawn at random from the whole micro-batch, a fresh draw "
                                             "every step (Qiu et al. Table 2's Shuffle LBL_micro)"))

    def route(self, logits):
        groups_of(logits.shape[0], self.cfg.balance_seqs, "balance_seqs")
        return Balancer.route(self, logits)

    def loss(self, routing):
        B, T, E = routing.probs.shape
        group_tokens = self.cfg.balance_seqs * T
        scores = own_scores(routing, self.cfg.gate).reshape(-1, group_tokens, E)
        position = None
        if self.cfg.balance_shuffle:
            order = self.permutation(B * T, scores.device)          # order[j]: the token in slot j
            position = torch.argsort(order)                           # position[t]: token t's slot
        counts = counts_per_group(routing, group_tokens, E, position)
        return self.cfg.alpha * switch_loss(counts, scores)


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
    paper = "Qiu et al. 2025, \"Demons in the Detail\""
    summary = "the same aux loss with f counted over the global batch"
    knobs = dict(Balancer.knobs, **TOKEN_CHOICE_KNOBS, alpha=ALPHA)          # as aux (Qiu et al. used 0.008)
    accum_invariant = False     # an early micro-step sees only the counts so far (Alg. 1's approximation)

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        # Scratch space within one optimizer step (zero again after step()),
        # so it need not be saved: persistent=False.
        self.register_buffer("seen", torch.zeros(n_experts, dtype=torch.long), persistent=False)

    def loss(self, routing):
        E = self.n_experts
        counts = count_per_expert(routing.expert_idx, E)
        if self.training:  # evaluation must not pollute the training buffer
            self.seen += all_reduce(counts, self.world_size)
            counts = self.seen
        return self.cfg.alpha * switch_loss(counts[None], own_scores(routing, self.cfg.gate).reshape(1, -1, E))

    def step(self, load):
        self.seen.zero_()


def unbiased_counts(routing, k, group_tokens):
    """Per (group, expert) counts of the top-k of the *unbiased* scores: the
    1(s_{i,t} in Topk({s_{j,t}}, K)) of DeepSeek-V3 Eq. 18. Under lossfree the
    experts actually chosen are the top-k of s + b; counting those instead
    would make the loss push against the bias that balances the load."""
    B, T, E = routing.probs.shape
    top = routing.probs.detach().topk(k, dim=-1).indices.reshape(-1, group_tokens * k)   # [G, n*k]
    return torch.zeros(top.shape[0], E, dtype=torch.long, device=top.device).scatter_add_(
        1, top, torch.ones_like(top))


class SeqAuxLossFree(LossFree):
    """`seq_aux`: DeepSeek-V3's recipe (DeepSeek-AI 2024, Sec. 2.1.2): lossfree
    routing plus a tiny auxiliary loss computed *within each sequence*
    (alpha = 1e-4), only to prevent extreme imbalance inside one sequence.
    Its Eq. 17-20: f counts the top-k of the unbiased scores s (Eq. 18), not
    the biased choice lossfree routes by, and P (Eq. 20) averages the
    normalised scores s' = s / sum_j s_j (Eq. 19). V3 also rescales each token's k gate
    weights to sum to 1; that is left out here so that the loss is the one
    thing this class adds to lossfree."""
    paper = "DeepSeek-V3 (DeepSeek-AI 2024)"
    summary = "lossfree plus a tiny per-sequence aux loss"
    knobs = dict(LossFree.knobs, alpha=ALPHA.but(default=1e-4))      # V3's value

    def loss(self, routing):
        B, T, E = routing.probs.shape
        counts = unbiased_counts(routing, self.top_k, T)
        return self.cfg.alpha * switch_loss(counts, routing.probs)


# ----------------------------------------------------------------------------
# Expert choice: the experts pick the tokens.

class ExpertChoice(RegroupsTokens):
    """`expert_choice`: Expert Choice routing (Zhou et al. 2022, Sec. 3.2).

    The roles flip: S = softmax(X W_g) over experts, and each *expert* takes the
    C tokens of its routing group that score it highest, C = n * c / E with
    capacity factor c = 2. Every expert gets exactly C tokens -- perfect balance,
    no loss -- and a token may get zero or several experts.

    The catch (Wang et al. 2024, Sec. 5.2 and App. D): whether token t is picked
    depends on how every other token of the group scores, later tokens of its
    own sequence included. The output at position t therefore depends on the
    future, which a causal language model must never see. The smaller the
    routing group (`route_seqs` sequences), the more a single choice reveals."""
    paper = "Zhou et al. 2022"
    summary = "experts pick their top-C tokens: balanced, but it leaks future tokens"
    token_choice = False
    fixed_k = False
    knobs = dict(Balancer.knobs,
                 capacity_factor=Knob(2.0, "c in C = n c / E tokens per expert (Zhou et al. Sec. 3.2, Eq. 1)",
                                      low=0, open_low=True),
                 route_seqs=Knob(2, "sequences per routing group", low=1, divides_batch=True),
                 route_tokens=Knob(0, "routing groups of this many consecutive tokens of one sequence (Wang et "
                                      "al. App. D.2: 512 of 2,048); 0: whole sequences (--route-seqs)", low=0),
                 route_shuffle=Knob(False, "fill routing groups with tokens shuffled across the micro-batch "
                                           "(the control for the leak, Wang et al. Fig. 9)"))

    def route(self, logits):
        B, T, E = logits.shape
        n = self.cfg.route_tokens
        if n and T > n and T % n:
            # A prefix that ends inside a chunk (causal evaluation, generation):
            # its last, partial chunk is a routing group of its own.
            head = T // n * n
            return join_in_time(self.route(logits[:, :head]), self.route(logits[:, head:]), head, T)
        n = min(n, T) if n else self.cfg.route_seqs * T              # tokens per routing group
        n_groups = B * T // n if self.cfg.route_tokens else groups_of(B, self.cfg.route_seqs, "route_seqs")
        scores = gate_scores(logits, self.cfg.gate).reshape(B * T, E)
        # Which token sits in which group. Normally group j is tokens
        # [j*n, (j+1)*n): whole sequences, or a chunk of one. With route_shuffle a permutation, fresh every step
        # and never one training used when evaluating, scatters every
        # sequence over all groups, so a group holds few tokens of any one
        # sequence and a choice reveals little about that sequence's future.
        slot = torch.arange(B * T, device=logits.device)
        if self.cfg.route_shuffle:
            slot = self.permutation(B * T, logits.device)
        C = expert_capacity(n, self.cfg.capacity_factor, E)
        top = scores[slot].view(n_groups, n, E).topk(C, dim=1)      # each expert's best C tokens
        offset = torch.arange(n_groups, device=logits.device)[:, None, None] * n
        token_idx = slot[(top.indices + offset).transpose(1, 2)]   # [groups, E, C]
        expert_idx = torch.arange(E, device=logits.device)[None, :, None].expand_as(token_idx)
        weight = top.values.transpose(1, 2)
        probs = (scores / scores.sum(-1, keepdim=True)).view(B, T, E)
        return Routing(token_idx.reshape(-1), expert_idx.reshape(-1), weight.reshape(-1), probs, logits)


def join_in_time(a, b, head, T):
    """One Routing of [B, T] tokens from those of positions [0, head) and [head, T)."""
    rows = lambda r, start, length: r.token_idx // length * T + start + r.token_idx % length
    return Routing(torch.cat([rows(a, 0, head), rows(b, head, T - head)]), torch.cat([a.expert_idx, b.expert_idx]),
                   torch.cat([a.weight, b.weight]), torch.cat([a.probs, b.probs], 1), torch.cat([a.logits, b.logits], 1))


def expert_capacity(n_tokens, capacity_factor, n_experts):
    """C = n * c / E tokens per expert (Zhou et al. 2022, Sec. 3.2, Eq. 1), at least 1 and
    at most the whole group."""
    return max(1, min(n_tokens, round(n_tokens * capacity_factor / n_experts)))


# ----------------------------------------------------------------------------
# Registration: one line per strategy. Nothing else in the project lists them.

BALANCERS = {
    "none": NoBalancing,
    "aux": AuxLoss,
    "global_aux": GlobalAuxLoss,
    "lossfree": LossFree,
    "seq_aux": SeqAuxLossFree,
    "expert_choice": ExpertChoice,
}


def register(name, cls):
    """Add a strategy to BALANCERS from outside this file (an exercise, a test
    fixture, a student's own module), as the one line above does here."""
    check_registration(name, cls)
    BALANCERS[name] = cls
    return cls


def make_balancer(name, n_experts, top_k, knobs=None, world_size=1):
    """Build the named strategy, checking the settings a newcomer gets wrong."""
    return check_strategy(name, n_experts, top_k, knobs or {})(n_experts, top_k, knobs, world_size)


# ----------------------------------------------------------------------------
# Settings: each knob's value in effect. Their checks, the registry's checks
# and the flags they become are in plumbing/knobs.py.

def settings(cls, given):
    """{knob: value in effect} for strategy class `cls`: the given value, else
    the class's default. A knob the strategy does not read is a mistake worth
    a message: `--alpha` on lossfree would otherwise be silently ignored.
    A value of None means "not given"."""
    given = {name: value for name, value in given.items() if value is not None}
    for name in given:
        if name not in cls.knobs:
            reads = ", ".join(flag(k) for k in cls.knobs)
            raise ValueError(f"{flag(name)} does not apply to {name_of(cls)}; it reads {reads}")
    return {name: given.get(name, knob.default) for name, knob in cls.knobs.items()}


def flag(name):
    return "--" + name.replace("_", "-")


import strategies  # noqa: E402,F401  (the methods since 2024, each registered from its own file)
