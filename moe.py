"""
moe.py -- a small GPT whose feed-forward layers are Mixtures of Experts,
expert-parallel from the first line.

Read it top to bottom:
  1. GPTConfig                  the model's shape and its balancing strategy
  2. CausalSelfAttention        ordinary causal attention (nothing MoE about it)
  3. Router, Experts, SwiGLU    the parts of an MoE layer
  4. AllToAll                   the one collective expert parallelism needs,
                                as a tiny autograd function
  5. MoELayer                   route -> sort by expert -> send to the owning
                                rank -> run the experts -> send back -> combine
  6. Block, GPT                 the transformer around it
  7. sync_gradients & co.       what an optimizer step needs when experts live
                                on different ranks
The experts as grouped matmuls (the same numbers, faster) are in
plumbing/kernels.py; which rank holds which experts (Mesh) in plumbing/mesh.py.

Every balancing strategy (balancers.py) hands MoELayer the same thing: a flat
list of assignments (token_idx, expert_idx, weight). Everything after routing
is shared, so the strategies differ only where the papers differ.

Expert parallelism: the W processes form a (dp, ep) grid (Mesh). Within
one row of ep ranks, the expert-parallel group, ep rank j holds experts
[j * E/ep, (j+1) * E/ep) and tokens travel only between those ranks; the dp
rows are replicas of each other, experts included. Every other parameter is
replicated on all W ranks. ep = W (the default) is one row, every rank its
own slice of the experts; one process is the same code with the exchanges
skipped.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from balancers import count_per_expert, make_balancer
from plumbing import kernels
from plumbing.knobs import check_config  # noqa: F401  (a model that cannot be built is refused in one line)
from plumbing.mesh import Mesh, MeshLayout  # noqa: F401  (who holds which experts)
from data import VOCAB_SIZE


@dataclass
class GPTConfig:
    vocab_size: int = VOCAB_SIZE   # bytes are tokens (data.py)
    seq_len: int = 128
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_experts: int = 16
    top_k: int = 2
    d_expert: int = 128            # hidden width of one expert's SwiGLU
    shared_experts: int = 0        # DeepSeekMoE-style always-on experts (Wang et al. used 2)
    balancer: str = "lossfree"
    balance: dict = field(default_factory=dict)   # the strategy's knobs (balancers.Knob); unset ones take its defaults


# ----------------------------------------------------------------------------
# Attention: standard, and causal by construction (the mask hides the future).

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


# ----------------------------------------------------------------------------
# The parts of an MoE layer.

class Router(nn.Module):
    """u_t . e_i for every token and expert. Computed in fp32 even under bf16
    autocast: top-k compares scores that often differ in the third decimal,
    and bf16 has fewer than three significant decimals."""

    def __init__(self, d_model, n_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, d_model) * 0.02)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


def swiglu(x, w13, w2):
    """SwiGLU MLP (Shazeer 2020): (silu(x W1) * x W3) W2. W1 and W3 are stored
    side by side as one [d, 2h] matrix so one matmul computes both."""
    return silu_gate(x @ w13) @ w2


def silu_gate(u):
    """The middle of swiglu: silu(a) * b for u = [a | b]."""
    a, b = u.chunk(2, dim=-1)
    return F.silu(a) * b


class Experts(nn.Module):
    """This rank's experts, weights stacked as [E_local, d, 2h] and [E_local, h, d].

    Tokens arrive sorted by expert, so expert e's tokens are one contiguous
    slice: running the experts is a loop over the (few) local experts, one
    SwiGLU per slice, never a loop over tokens. The same sums can be done in
    one grouped matmul per projection; that and the choice between the two
    live in plumbing/kernels.py."""

    def __init__(self, cfg, mesh=Mesh()):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.d_model, cfg.d_expert
        # Draw the weights of *all* E experts, then keep this rank's slice. Every
        # rank consumes the random stream identically, so replicated parameters
        # created later match across ranks, and expert e has the same initial
        # weights whatever the mesh (the multi-rank == 1-rank tests need it).
        w13 = torch.randn(E, d, 2 * h) * 0.02
        w2 = torch.randn(E, h, d) * 0.02 / math.sqrt(2 * cfg.n_layers)
        mine = mesh.layout.experts_of(mesh.rank, E)
        self.w13 = nn.Parameter(w13[mine.start:mine.stop].clone())
        self.w2 = nn.Parameter(w2[mine.start:mine.stop].clone())

    def forward(self, x, counts):
        """x: [N, d] rows sorted by local expert; counts: rows per local expert,
        a list or a 1-D tensor. Returns [N, d] in x's dtype, which under
        autocast is already the compute dtype (MoELayer.combine gathers the
        rows in it)."""
        if kernels.grouped_mm_fast_on_cuda(x, self.w13, self.w2):
            return kernels.grouped_experts_bf16(x, counts, self.w13, self.w2).to(x.dtype)
        counts = counts.tolist() if torch.is_tensor(counts) else counts
        if kernels.grouped_is_faster_on_cpu(x, counts, self.w13, self.w2):
            return kernels.grouped_experts_cpu(x, counts, self.w13, self.w2)
        return self.forward_loop(x, counts).to(x.dtype)

    def forward_loop(self, x, counts):
        """The plain way: one swiglu per expert on its slice."""
        # unbind() hands out every expert's matrices as views through a single
        # autograd node, whose backward stacks the E gradients once. Indexing
        # self.w13[e] inside the loop would instead give each expert its own
        # backward that zero-fills a gradient the size of *all* experts: E^2
        # memory traffic, which made the layer several times slower.
        pieces = zip(x.split(counts), self.w13.unbind(0), self.w2.unbind(0))
        return torch.cat([expert_rows(rows, w13, w2) for rows, w13, w2 in pieces])


MIN_ROWS = 16


def expert_rows(x, w13, w2):
    """swiglu on one expert's rows, padded to at least MIN_ROWS rows.

    Why pad: CPU BLAS switches to other kernels for matrices of a handful of
    rows, which round differently. A token's output would then depend, in the
    last bit, on how many *other* tokens chose the same expert, and the
    causality probe would read 1e-7 instead of 0 for token choice. With a
    floor on the row count every row goes through the same arithmetic."""
    n = x.shape[0]
    if 0 < n < MIN_ROWS:
        return swiglu(F.pad(x, (0, 0, 0, MIN_ROWS - n)), w13, w2)[:n]
    return swiglu(x, w13, w2)


class SharedExpert(nn.Module):
    """An always-on SwiGLU applied to every token (DeepSeekMoE), replicated on
    every rank like attention."""

    def __init__(self, cfg):
        super().__init__()
        h = cfg.d_expert * cfg.shared_experts
        self.w13 = nn.Parameter(torch.randn(cfg.d_model, 2 * h) * 0.02)
        self.w2 = nn.Parameter(torch.randn(h, cfg.d_model) * 0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, x):
        return swiglu(x, self.w13, self.w2)


# ----------------------------------------------------------------------------
# The exchange between ranks.

class AllToAll(torch.autograd.Function):
    """Rows [in_splits[r] for each rank r of `group`] leave for rank r; rows
    from each rank arrive in out_splits order.

    Why is the backward the reverse exchange? The forward is a permutation of
    rows across ranks: row j of my input becomes row j' of some rank's output.
    The gradient of a permutation is the inverse permutation, so the gradient
    of that output row must travel back to exactly where the row came from:
    the same all-to-all with the two split lists swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def wire_dtype(x):
    """The dtype of the dispatch: rows are gathered, sent to the experts'
    ranks, weighted and summed in it. Under autocast that is the compute
    dtype (bf16 on a GPU), else x's own. The experts' first matmul would
    round the rows to bf16 anyway, so rounding them at the gather changes no
    number the experts see and halves the bytes of every copy after it; the
    results come back in bf16, which is what the experts produced."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ----------------------------------------------------------------------------
# The MoE layer.

class MoELayer(nn.Module):
    def __init__(self, cfg, mesh=Mesh()):
        super().__init__()
        self.n_experts, self.mesh = cfg.n_experts, mesh
        self.n_local = cfg.n_experts // mesh.ep_size
        self.router = Router(cfg.d_model, cfg.n_experts)
        # The strategy's counts are the whole global batch's: it all-reduces
        # over every rank, not over the expert-parallel group.
        self.balancer = make_balancer(cfg.balancer, cfg.n_experts, cfg.top_k, cfg.balance, mesh.world_size)
        self.experts = Experts(cfg, mesh)
        self.shared = SharedExpert(cfg) if cfg.shared_experts else None
        # Assignments per expert counted over the current optimizer step, in
        # training mode only (evaluation must not steer the lossfree bias).
        self.register_buffer("load", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)
        # The same step's router entropy for the health figures (plumbing/health.py):
        # the sum over tokens of each token's entropy, and how many tokens.
        self.register_buffer("entropy", torch.zeros(2, dtype=torch.float64), persistent=False)
        # ... and the assignments --expert-capacity dropped (Routing.dropped; 0 when dropless).
        self.register_buffer("dropped", torch.zeros(1, dtype=torch.float64), persistent=False)

    def forward(self, x):
        """x: [B, T, d]. Returns y, the strategy's loss and the routing. Under
        autocast y is in the compute dtype (bf16 on a GPU); Block adds it to
        the fp32 residual stream."""
        B, T, d = x.shape
        routing, loss = self.balancer(self.router(x))
        # Counted once, used twice: the step's load statistic and the sizes
        # of the experts' blocks of rows.
        counts = count_per_expert(routing.expert_idx, self.n_experts)
        if self.training:
            self.load += counts
            self.entropy[0] += torch.special.entr(routing.probs.detach()).sum()
            self.entropy[1] += B * T
            self.dropped += routing.dropped
        h = x.reshape(B * T, d)
        y = self.combine(h, routing, counts)
        if self.shared is not None:
            y = y + self.shared(h)
        return y.view(B, T, d), loss, routing

    def combine(self, h, routing, counts):
        """y_t = sum over t's assignments of weight * expert(h_t)."""
        h = h.to(wire_dtype(h))
        weight = routing.weight.to(h.dtype)
        # One sort per layer puts each expert's rows next to each other.
        order = torch.argsort(routing.expert_idx, stable=True)
        k = self.balancer.top_k
        if self.balancer.fixed_k and routing.expert_idx.numel() == h.shape[0] * k:
            return self.combine_k_per_token(h, weight, order, counts, k)
        # Expert choice, expert-threshold routing, or token choice that dropped
        # assignments (exercise 3's capacity): a token has 0 to E assignments, so the sum per
        # token has no fixed shape and index_add_ adds every row into its
        # token's (a token with none gets zero: the residual carries it).
        # On a GPU index_add_ adds with atomics, in whatever order they land:
        # the last bits of y may differ from run to run. index_select rather
        # than h[token_idx]: same rows, but its backward is a plain index_add_,
        # cheaper than the accumulating index_put_ of [].
        token_idx = routing.token_idx[order]
        out = self.run_experts(h.index_select(0, token_idx), counts)
        return torch.zeros_like(h).index_add_(0, token_idx, out * weight[order, None])

    def combine_k_per_token(self, h, weight, order, counts, k):
        """Token choice: every token has exactly k assignments, listed token by
        token as balancers.top_k_routing lists them (assignment a = t * k + j
        is token t's j-th choice), so y_t is a sum of k rows, in the same
        order every run: bit for bit reproducible, on a GPU too. No step adds
        two numbers into one place concurrently, forward or backward."""
        N, d = h.shape
        # Every token's row k times, in assignment order, then in expert order.
        # The backward of expand sums the k copies' gradients in a fixed order,
        # and `order` is a permutation, so no two gradient rows land in one
        # place (gathering h by token_idx would send k of them to each token).
        rows = h.unsqueeze(1).expand(N, k, d).reshape(N * k, d).index_select(0, order)
        out = self.run_experts(rows, counts)
        # Back to assignment order with the inverse permutation: row i of out
        # belongs to assignment order[i], so assignment a reads row inverse[a].
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=order.device))
        out = out.index_select(0, inverse).view(N, k, d)
        # y_t = sum over t's k chosen experts of w * expert(h_t) (Fedus et al.
        # 2021, Eq. 2). The sum runs over a middle axis of fixed length: its
        # order is j = 0..k-1 on every run, and in bf16 it adds in fp32 and
        # rounds once.
        return (out * weight.view(N, k, 1)).sum(1)

    def run_experts(self, x, counts):
        """x: [A, d] rows sorted by global expert id, counts: [E] rows per expert.
        The exchanges run within this rank's expert-parallel group (a row of
        the mesh); ranks below are ranks of that group."""
        if self.mesh.ep_size == 1:
            return self.experts(x, counts)    # a tensor: the CUDA experts need no host sync
        W, L, group = self.mesh.ep_size, self.n_local, self.mesh.ep_group
        # 1. Tell every rank how many rows it will receive for each of its experts.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)  # [W * L]: (source rank, local expert)
        # The layer's one wait for the GPU, and a necessary one: the exchange
        # takes its split sizes as host integers (NCCL sizes its transfers and
        # the receive buffer from them). One copy brings both lists.
        send, recv = torch.stack([counts, recv_counts]).tolist()
        send_splits = [sum(send[r * L:(r + 1) * L]) for r in range(W)]
        recv_splits = [sum(recv[r * L:(r + 1) * L]) for r in range(W)]
        # 2. Send the rows (already in the dispatch dtype, wire_dtype). They
        #    arrive grouped by source rank, then by expert.
        rx = AllToAll.apply(x.to(wire_dtype(x)), recv_splits, send_splits, group)
        # 3. Regroup by local expert so each expert's rows are contiguous again.
        #    The rows arrive as blocks (source rank r, expert l); listing the
        #    blocks in (l, r) order is all it takes: whole blocks move, in one
        #    copy, with no second sort and no per-row index.
        blocks = rx.split(recv)
        by_expert = [(r, l) for l in range(L) for r in range(W)]
        y = self.experts(torch.cat([blocks[r * L + l] for r, l in by_expert]),
                         [sum(recv[r * L + l] for r in range(W)) for l in range(L)])
        # 4. Put the result blocks back in (source rank, expert) order and send
        #    them back where the rows came from (the reverse exchange).
        y_blocks = dict(zip(by_expert, y.split([recv[r * L + l] for r, l in by_expert])))
        ry = torch.cat([y_blocks[r, l] for r in range(W) for l in range(L)])
        return AllToAll.apply(ry, send_splits, recv_splits, group).to(x.dtype)


# ----------------------------------------------------------------------------
# The transformer around it.

class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, cfg, mesh=Mesh()):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.moe = MoELayer(cfg, mesh)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        y, loss, routing = self.moe(self.norm2(x))
        # Under autocast y is bf16; the sum is in x's fp32, so the residual
        # stream keeps its precision.
        return x + y, loss, routing


@dataclass
class GPTOutput:
    logits: torch.Tensor           # [B, T, vocab]
    lm_loss: torch.Tensor | None   # mean next-token cross-entropy (None without targets)
    balance_loss: torch.Tensor     # the strategies' extra loss, summed over layers
    routings: list                 # one balancers.Routing per layer (for metrics)


class GPT(nn.Module):
    def __init__(self, cfg, mesh=Mesh()):
        super().__init__()
        check_config(cfg, mesh.ep_size)
        self.cfg, self.mesh = cfg, mesh
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, mesh) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        # Untied output head: with 256 byte tokens the embedding is tiny, so
        # tying would save almost nothing, and untied is one less coupling to
        # explain when reading gradients.
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_replicated()

    def _init_replicated(self):
        """GPT-2 style: N(0, 0.02), residual projections shrunk by 1/sqrt(2L)
        so the residual stream does not grow with depth. (Experts drew their
        own weights in Experts.__init__.)"""
        for name, p in self.named_parameters():
            if ".experts." in name or ".shared." in name or "norm" in name:
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        balance_losses, routings = [], []
        for block in self.blocks:
            x, loss, routing = block(x)
            balance_losses.append(loss)
            routings.append(routing)
        logits = self.head(self.norm(x))
        lm_loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        # Summed over layers, each layer's loss with the full alpha: "for each
        # Switch layer, this auxiliary loss is added to the total model loss"
        # (Fedus et al. 2021, Sec. 2.2; Wang et al. and Qiu et al. mean alpha
        # the same way). Each layer is balanced on its own: never pool all
        # layers' logits as if expert i of every layer were one expert.
        return GPTOutput(logits, lm_loss, torch.stack(balance_losses).sum(), routings)

    def moe_layers(self):
        return [block.moe for block in self.blocks]

    def active_params(self):
        """Parameters one token is multiplied with, the N of "6N FLOPs per
        token": attention, router, its top_k routed experts and the shared
        ones, and the output head. Embeddings are lookups and norms are
        negligible, so neither counts. (Expert choice gives a token top_k
        experts on average when its capacity factor equals top_k.)"""
        cfg, d = self.cfg, self.cfg.d_model
        per_layer = 4 * d * d + d * cfg.n_experts + (cfg.top_k + cfg.shared_experts) * 3 * d * cfg.d_expert
        return cfg.n_layers * per_layer + d * cfg.vocab_size

    def strategy_state(self):
        """{name: [n_layers, ...] tensor} of every layer's strategy state
        (balancers.Balancer.state), e.g. {"bias": [layers, E]} for lossfree."""
        states = [layer.balancer.state() for layer in self.moe_layers()]
        return {k: torch.stack([s[k] for s in states]) for k in states[0]}

    def end_step(self, entropy=False):
        """Call once per optimizer step, after all micro-steps. Sums each
        layer's load over all ranks (every row of the mesh: the whole global
        batch, not one expert-parallel group's share), hands it to the
        strategy's step() (lossfree updates its bias here, global_aux resets
        its buffer) and returns the global load [n_layers, E] for MaxVio_batch.
        entropy=True: returns (load, mean router entropy per token [n_layers]),
        the latter summed over ranks in one more small all-reduce, as is
        self.last_dropped, the step's assignments dropped for capacity."""
        loads = torch.stack([layer.load for layer in self.moe_layers()])
        sums = torch.stack([torch.cat([m.entropy, m.dropped]) for m in self.moe_layers()])   # [n_layers, 3]
        if self.mesh.world_size > 1:
            dist.all_reduce(loads)
            if entropy:
                dist.all_reduce(sums)
        for layer, load in zip(self.moe_layers(), loads):
            layer.balancer.step(load)
            layer.load.zero_()
            layer.entropy.zero_()
            layer.dropped.zero_()
        self.last_dropped = sums[:, 2].long()       # per layer: the health figure "dropped"
        return (loads, sums[:, 0] / sums[:, 1].clamp(min=1)) if entropy else loads


@torch.no_grad()
def causal_logits(model, idx):
    """The logits a model can produce while generating: position t computed
    from positions <= t only. [B, T] -> [B, T, vocab].

    One forward per prefix length: the logits at t come from the model run on
    idx[:, :t+1], so every routing group holds only the prefix of its
    sequences, exactly what generation sees. Token-choice routing is per
    token, so this equals the ordinary (teacher-forced) forward up to float
    rounding. Expert choice compares tokens of its group, later ones included;
    here the later ones are not there, and its teacher-forced loss stops
    being a lower bound it cannot reach (Wang et al. 2024, Sec. 5.2).
    Costs T forwards of growing length: an evaluation and generation tool,
    not a training one."""
    T = idx.shape[1]
    return torch.stack([model(idx[:, :t + 1]).logits[:, -1] for t in range(T)], dim=1)


# ----------------------------------------------------------------------------
# Optimizer-step helpers for expert parallelism.

def is_expert_param(name):
    return ".experts." in name


def sync_gradients(model):
    """Make every rank's gradients those of the global mean loss.

    Each rank's loss is the mean over its own tokens; the global loss is the
    mean of those over all W ranks. Replicated parameters: average the
    gradients over all W ranks (one all-reduce of a flat buffer). Expert
    parameters: within a row of the mesh, the owner already received the
    gradient of every row member's tokens through the reverse all-to-all,
    i.e. the *sum* of those ep ranks' losses; summing that over the column
    (the dp replicas of the same experts) gives the sum over all W ranks,
    and dividing by W the mean. With dp = 1 the column is the rank alone."""
    mesh = model.mesh
    W = mesh.world_size
    if W == 1:
        return
    replicated = [p.grad for n, p in model.named_parameters() if not is_expert_param(n) and p.grad is not None]
    all_reduce_mean(replicated, W, group=None)
    experts = [p.grad for n, p in model.named_parameters() if is_expert_param(n) and p.grad is not None]
    if mesh.dp_size > 1:
        all_reduce_mean(experts, W, group=mesh.dp_group)
    else:
        for g in experts:
            g /= W


def all_reduce_mean(grads, divisor, group):
    """Sum the tensors over `group` in one all-reduce of a flat buffer, then
    divide by `divisor`, in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divisor
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def clip_grad_norm(model, max_norm):
    """Global gradient-norm clipping when experts are sharded: replicated
    gradients are identical on every rank (count them once), expert gradients
    are disjoint within a row of the mesh (sum their squares over the row)
    and identical across rows (count one row). Returns the norm."""
    device = next(model.parameters()).device
    grads = {"replicated": [], "expert": []}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads["expert" if is_expert_param(n) else "replicated"].append(p.grad)
    sq_rep, sq_exp = (sum_of_squares(grads[kind], device) for kind in ("replicated", "expert"))
    if model.mesh.ep_size > 1:
        dist.all_reduce(sq_exp, group=model.mesh.ep_group)
    norm = (sq_rep + sq_exp).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    # One multi-tensor kernel for all gradients (a handful of launches on a
    # GPU), not one per parameter.
    torch._foreach_mul_(grads["replicated"] + grads["expert"], scale)
    return norm


def sum_of_squares(tensors, device):
    """The sum of the squares of every element of `tensors`, in fp32, as a
    0-d tensor on `device`. torch._foreach_norm computes the tensors' norms
    in a few multi-tensor kernels (what torch.nn.utils.clip_grad_norm_ uses)
    instead of a kernel or two per parameter."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(tensors, dtype=torch.float32)).square().sum()
