"""
lab/bench.py -- how fast is the MoE, and where does the time go?

    python -m lab.bench                  # every figure, default preset (about 40 s on 2 idle cores)
    python -m lab.bench --quick          # the two headline figures only (about 13 s)
    python -m lab.bench --json out.json  # also write the figures to a file
    python -m lab.bench --peers          # only the comparison with other MoE layers (2 to 3 minutes)
    python -m lab.bench --grouped-vs-loop  # only the measurements behind the CPU experts' rule (about a minute)
    python -m lab.bench --checkpoint-memory  # only each rank's memory while saving and resuming (about a minute)

Run it from the repository root, where the lesson's modules (train.py,
moe.py, ...) import as they do for train.py.

It prints a table and measures, all in one run:

  moe_over_dense   forward+backward time of one MoE feed-forward layer (router,
                   routing, dispatch, experts, combine) over that of a dense
                   SwiGLU with the same active parameters (hidden width
                   top_k * d_expert) on the same tokens, for every strategy.
  mfu              model FLOPs per second of a full training step (train.py's
                   train_step: forward, backward, clipping, AdamW) over the
                   matmul throughput of this machine, measured here with a
                   large square matmul (fp32 on CPU, bf16 on GPU).
  ep2_over_ep1     tokens/s of 2 expert-parallel processes x 1 thread over
                   1 process x 2 threads on the same global batch, and the
                   share of the step spent inside all-to-all.
  scaling          step time for 8, 16 and 64 experts at the same active
                   parameters, and for several batch sizes.
  peak memory      peak resident set size of the processes (peak allocated
                   memory on GPU).

With --peers it measures only:

  peer_over_project  forward+backward time of other implementations of the
                   same MoE layer (Hugging Face transformers' Qwen3-MoE block
                   with each of its experts implementations, a textbook mask
                   loop) over the project's, holding the same weights and
                   routing in fp32 as the project does (their outputs are
                   checked equal), at the preset's size and a large one.
                   transformers is optional: without it only the mask loop
                   is compared.

With --checkpoint-memory it measures only:

  checkpoint memory  how far each rank's resident memory rises while it
                   saves a checkpoint of 4 processes (ep 4, and 2 x 2) and
                   while it resumes from one on 4, 2 and 1 processes, next to
                   the bytes of its own experts' state (weights and both AdamW
                   moments) and of all experts' state. A design that gathers
                   the experts onto one rank rises by the latter there.

Timing: every figure is a median over repeats after warm-up, and whatever is
compared (MoE vs dense, step vs matmul) is measured interleaved in the same
process, so a burst of load from other programs hits both sides. The load
average before and after is printed: on a busy machine, run it again.
"""

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import plumbing
import train
from balancers import BALANCERS
from data import Corpus
from moe import GPT, GPTConfig, MoELayer, is_expert_param, swiglu
from plumbing.kernels import grouped_experts_cpu, grouped_is_faster_on_cpu, grouped_mm_on_cpu

STRATEGIES = list(BALANCERS)
TOKEN_CHOICE = [s for s in STRATEGIES if BALANCERS[s].token_choice]
EXPERT_COUNTS = [8, 16, 64]          # the experts-scaling sweep (the first is the reference)
# moe_over_dense has no target any more: a dense layer is not what a user would
# pick instead of this one; other MoE layers are (--peers, at or above 1.0).
TARGETS = {"mfu": 0.40, "experts_64_over_8": 1.5, "peer_over_project": 1.0}


# ----------------------------------------------------------------------------
# Timing helpers.

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns, warmup, repeats, device, block=1):
    """Time every function of `fns` (name -> callable) `repeats` times, taking
    turns, after `warmup` untimed rounds. Returns name -> list of seconds.

    The order flips every round so neither side always runs on a warm cache.
    With block > 1 each turn is `block` calls in a row of which the first is
    not timed: a training step right after another model's step (or a large
    matmul) starts with cold caches, which training itself never does."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            for i in range(block):
                sync(device)
                t0 = time.perf_counter()
                fns[name]()
                sync(device)
                if i > 0 or block == 1:
                    times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(num, den):
    """Median of the per-round ratios: a load burst that slows one round
    spoils one ratio, not the whole estimate."""
    return statistics.median(a / b for a, b in zip(num, den))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


# ----------------------------------------------------------------------------
# Models, data and FLOPs.

def make_args(preset, balancer, extra=()):
    args = train.parse_args(["--preset", preset, "--balancer", balancer, *extra])
    plumbing.check_args(args, 1)
    return args


def random_corpus(seed=0, size=200_000):
    """Three domains of random bytes: the speed of a step does not depend on
    the text, and this avoids building (and caching) the real corpus."""
    g = torch.Generator().manual_seed(seed)
    streams = [torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8) for _ in range(3)]
    return Corpus(domains=["a", "b", "c"], train=streams, val=[s[:1000] for s in streams],
                  train_docs=[1, 1, 1], val_docs=[1, 1, 1], source="random bytes")


def flops_per_token(model):
    """Training FLOPs per token: 6 per active parameter (2 forward, 4 backward)
    plus attention's two T x T products, 12 * n_layers * T * d for a full
    T x T score matrix, halved because the causal mask leaves half of it
    empty (and the attention kernel skips it)."""
    cfg = model.cfg
    return 6 * model.active_params() + 6 * cfg.n_layers * cfg.seq_len * cfg.d_model


class TrainLoop:
    """A model, its optimizer and a step counter: calling it runs one
    train.train_step on the next global batch."""

    def __init__(self, args, corpus, device, rank=0, world_size=1):
        self.args, self.corpus, self.step = args, corpus, 0
        self.proc = plumbing.Proc(rank, world_size, device).start()     # start(): the expert-parallel mesh
        self.model, self.opt = train.build(args, self.proc)

    def __call__(self):
        train.train_step(self.model, self.opt, self.corpus, self.step, self.args, self.proc)
        self.step += 1


# ----------------------------------------------------------------------------
# 1. MoE layer vs dense layer.

def bench_layers(preset, strategies, warmup, repeats, device):
    """moe_over_dense for each strategy, on the default preset's token batch."""
    results = {}
    for name in strategies:
        args = make_args(preset, name)
        cfg = plumbing.model_config(args)
        torch.manual_seed(0)
        # The first block's MoE layer, initialised exactly as in training.
        layer = GPT(cfg).blocks[0].moe.to(device).train()
        hidden = cfg.top_k * cfg.d_expert
        w13 = torch.nn.Parameter(torch.randn(cfg.d_model, 2 * hidden, device=device) * 0.02)
        w2 = torch.nn.Parameter(torch.randn(hidden, cfg.d_model, device=device) * 0.02)
        x = torch.randn(args.batch_size, args.seq_len, cfg.d_model, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        params = [x, w13, w2, *layer.parameters()]

        def moe():
            for p in params:
                p.grad = None            # as after opt.zero_grad(set_to_none=True)
            with train.autocast(device):
                y, loss, _ = layer(x)
            if loss.requires_grad:       # lossfree has no loss to differentiate
                torch.autograd.backward([y, loss], [grad, torch.ones_like(loss)])
            else:
                y.backward(grad)

        def dense():
            for p in params:
                p.grad = None
            with train.autocast(device):
                y = swiglu(x.view(-1, cfg.d_model), w13, w2)
            y.backward(grad.view(-1, cfg.d_model))

        def routing():
            """The part of the MoE layer that is the strategy's: router logits,
            route() and loss(), backward through the gate weights."""
            for p in params:
                p.grad = None
            with train.autocast(device):
                r = layer.balancer.route(layer.router(x))
                loss = layer.balancer.loss(r)
            outs = [r.weight, loss] if loss.requires_grad else [r.weight]
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

        # The experts alone, on rows already routed, sorted and gathered: the
        # same FLOPs as the dense layer, cut into one block per expert.
        with torch.no_grad():
            r = layer.balancer.route(layer.router(x))
        counts = torch.bincount(r.expert_idx, minlength=cfg.n_experts).tolist()
        rows = x.detach().view(-1, cfg.d_model).index_select(0, r.token_idx[torch.argsort(r.expert_idx, stable=True)])
        rows.requires_grad_()
        rows_grad = torch.randn_like(rows)

        def experts():
            for p in [rows, *params]:
                p.grad = None
            with train.autocast(device):
                y = layer.experts(rows, counts)
            y.backward(rows_grad)

        times = interleaved({"moe": moe, "dense": dense, "routing": routing, "experts": experts},
                            warmup, repeats, device)
        layer.load.zero_()
        results[name] = {"moe_ms": 1e3 * statistics.median(times["moe"]),
                         "dense_ms": 1e3 * statistics.median(times["dense"]),
                         "routing_ms": 1e3 * statistics.median(times["routing"]),
                         "moe_over_dense": median_ratio(times["moe"], times["dense"]),
                         "routing_over_dense": median_ratio(times["routing"], times["dense"]),
                         "experts_over_dense": median_ratio(times["experts"], times["dense"])}
    return results


# ----------------------------------------------------------------------------
# 2. MFU of a training step.

def matmul_peak(size, device):
    """A function doing one size x size matmul, and its FLOP count. fp32 on
    CPU (what training uses there), bf16 on GPU (what autocast uses)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * size ** 3


def bench_mfu(preset, balancer, corpus, matmul_size, warmup, repeats, device):
    args = make_args(preset, balancer)
    step = TrainLoop(args, corpus, device)
    mm, mm_flops = matmul_peak(matmul_size, device)
    times = interleaved({"step": step, "matmul": mm}, warmup, repeats, device, block=3)
    tokens = args.batch_size * args.seq_len
    step_s, mm_s = statistics.median(times["step"]), statistics.median(times["matmul"])
    step_flops = flops_per_token(step.model) * tokens
    active, per_token = step.model.active_params(), flops_per_token(step.model)
    achieved, peak = step_flops / step_s, mm_flops / mm_s
    del step
    return {"mfu": achieved / peak, "step_ms": 1e3 * step_s, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "model_gflop_per_step": step_flops / 1e9,
            "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": peak / 1e9,
            "matmul_best_gflops": mm_flops / min(times["matmul"]) / 1e9,
            "matmul_size": matmul_size, "matmul_dtype": "bf16" if device.type == "cuda" else "fp32",
            "active_params": active, "flops_per_token": per_token}


# ----------------------------------------------------------------------------
# 3. Expert parallelism: 2 processes x 1 thread vs 1 process x 2 threads.

def ep_worker(rank, world_size, threads, preset, balancer, warmup, repeats):
    """One rank of the expert-parallel benchmark (a fresh process, started by
    plumbing.spawn with its gloo group already joined)."""
    torch.set_num_threads(threads)
    # Count the time spent inside all-to-all: moe.py calls it through the
    # torch.distributed module, so wrapping the attribute catches every call
    # (the count exchange and the rows, forward and backward).
    in_all_to_all = [0.0]
    real_all_to_all = dist.all_to_all_single

    def timed_all_to_all(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_all_to_all(*a, **kw)
        finally:
            in_all_to_all[0] += time.perf_counter() - t0

    dist.all_to_all_single = timed_all_to_all
    try:
        args = make_args(preset, balancer)
        step = TrainLoop(args, random_corpus(), torch.device("cpu"), rank, world_size)
        for _ in range(warmup):
            step()
        times, shares = [], []
        for _ in range(repeats):
            dist.barrier()           # start every step together
            in_all_to_all[0] = 0.0
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            shares.append(in_all_to_all[0] / times[-1])
        return {"step_s": times, "all_to_all_share": shares,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tokens_per_step": args.batch_size * args.seq_len}
    finally:
        dist.all_to_all_single = real_all_to_all


def run_ep(world_size, threads, preset, balancer, warmup, repeats, attempts=2):
    for attempt in range(attempts):
        try:
            ranks = plumbing.spawn(ep_worker, world_size, threads, preset, balancer, warmup, repeats, timeout=600)
            break
        except (RuntimeError, TimeoutError) as e:
            # On a shared machine the free port can be taken by someone
            # else before the rendezvous binds it: one retry, new port.
            if attempt + 1 == attempts:
                raise
            print(f"warning: expert-parallel run failed ({str(e).splitlines()[0]}); retrying once", file=sys.stderr)
    # A step ends when the slowest rank is done; the ranks wait for each other
    # in the collectives anyway, so their step times barely differ.
    step_s = [max(ts) for ts in zip(*(r["step_s"] for r in ranks))]
    share = statistics.median(statistics.mean(s) for s in zip(*(r["all_to_all_share"] for r in ranks)))
    tokens = ranks[0]["tokens_per_step"]
    return {"processes": world_size, "threads_per_process": threads,
            "step_ms": 1e3 * statistics.median(step_s), "tokens_per_s": tokens / statistics.median(step_s),
            "all_to_all_share": share, "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in ranks]}


def bench_ep(preset, balancer, total_threads, warmup, repeats):
    if total_threads % 2:
        raise ValueError(f"--threads {total_threads}: the expert-parallel comparison splits the threads "
                         f"over 2 processes, use an even number")
    one = run_ep(1, total_threads, preset, balancer, warmup, repeats)
    two = run_ep(2, total_threads // 2, preset, balancer, warmup, repeats)
    return {"ep2_over_ep1": two["tokens_per_s"] / one["tokens_per_s"],
            "all_to_all_share": two["all_to_all_share"], "one_process": one, "two_processes": two}


# ----------------------------------------------------------------------------
# 4. Scaling: number of experts at fixed active parameters, tokens per step.

def bench_scaling(preset, balancer, corpus, experts, batch_sizes, warmup, repeats, device):
    """Step time for each expert count (top_k and d_expert fixed, so the active
    parameters stay the same: only the number of experts to choose from grows)
    and for each batch size. The configurations take turns, so a slow moment
    of the machine is shared among them."""
    def loop(extra):
        return TrainLoop(make_args(preset, balancer, extra), corpus, device)

    by_experts = interleaved({e: loop(["--n-experts", str(e)]) for e in experts}, warmup, repeats, device, block=3)
    experts_out = {str(e): {"step_ms": 1e3 * statistics.median(t), "over_first": median_ratio(t, by_experts[experts[0]])}
                   for e, t in by_experts.items()}
    seq_len = make_args(preset, balancer).seq_len
    by_batch = interleaved({b: loop(["--batch-size", str(b)]) for b in batch_sizes}, warmup, repeats, device, block=3)
    tokens_out = {str(b * seq_len): {"batch_size": b, "step_ms": 1e3 * statistics.median(t),
                                     "tokens_per_s": b * seq_len / statistics.median(t)}
                  for b, t in by_batch.items()}
    return experts_out, tokens_out


# ----------------------------------------------------------------------------
# 5. Peers: the same MoE layer as other code bases write it.
#
# A user who wants a top-k MoE layer could also take Hugging Face's, or write
# the textbook loop. Each peer gets the project's weights (so its outputs must
# equal the project's), the same tokens and the same output gradient, and all
# of them take turns in one process: the figure is each peer's time over the
# project's, a median of per-round ratios. Above 1.0 the project is faster.

# Besides the preset's own layer and batch: a layer shaped like a small
# production MoE (64 fine-grained experts, top-8, as in OLMoE).
PEER_LARGE = dict(d_model=512, n_experts=64, top_k=8, d_expert=256, tokens=4096)


def peer_sizes(preset):
    """The preset's MoE layer on one global batch, and the large size (left
    out for the tiny smoke-test preset)."""
    args = make_args(preset, "none")
    own = dict(d_model=args.d_model, n_experts=args.n_experts, top_k=args.top_k, d_expert=args.d_expert,
               tokens=args.batch_size * args.seq_len)
    return {preset: own} if preset == "tiny" else {preset: own, "large": PEER_LARGE}


class MaskLoopMoE(torch.nn.Module):
    """The textbook MoE layer: softmax top-k, then for every expert find its
    tokens with a mask, run its SwiGLU on them and add the gated result back.
    The same maths as the project's `none` strategy."""

    def __init__(self, layer):
        super().__init__()
        self.top_k = layer.balancer.top_k
        self.router = torch.nn.Parameter(layer.router.weight.detach().clone())
        self.w13 = torch.nn.Parameter(layer.experts.w13.detach().clone())
        self.w2 = torch.nn.Parameter(layer.experts.w2.detach().clone())

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        # The router in fp32 with autocast off, as the project's (moe.Router
        # says why): the comparison is of two implementations of the same
        # routing, so both must pick the same experts.
        with torch.autocast(h.device.type, enabled=False):
            probs = torch.nn.functional.linear(h.float(), self.router).softmax(dim=-1)
        weight, expert = probs.topk(self.top_k, dim=-1)
        out = torch.zeros_like(h)
        for e in range(self.w13.shape[0]):
            token, slot = torch.where(expert == e)
            y = swiglu(h[token], self.w13[e], self.w2[e]) * weight[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view_as(x)


class Fp32Router(torch.nn.Module):
    """A peer's router run as the project runs its own (moe.Router): fp32
    weights, fp32 input, autocast off. Under bf16 autocast a router's matmul
    is rounded to bf16, and top-k then picks other experts for the tokens
    whose scores are close: their outputs differ by whole expert outputs,
    not by rounding, and the comparison would fail for that reason alone."""

    def __init__(self, router):
        super().__init__()
        self.router = router.float()

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.router(x.float())


def hf_peers(layer):
    """Hugging Face transformers' Qwen3-MoE sparse block (OLMoE's is the same
    code) holding the project's weights, once per experts implementation that
    suits training: `eager` (their default, a loop over the experts hit) and
    `grouped_mm` (one torch._grouped_mm per projection, their fastest here).
    Their third, `batched_mm`, gathers a weight matrix per (token, expert)
    pair: made for decoding a few tokens, gigabytes at these sizes.
    Returns the blocks by name, and why there are none if so."""
    try:
        import transformers
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return {}, "transformers is not installed (pip install transformers): Hugging Face peers skipped"
    if int(transformers.__version__.split(".")[0]) < 5:
        return {}, (f"transformers {transformers.__version__} keeps its experts in a list of modules; "
                    f"the peers need 5.x: Hugging Face peers skipped")
    E, d, two_h = layer.experts.w13.shape
    peers = {}
    for impl in ("eager", "grouped_mm"):
        # norm_topk_prob=False: the gates are the plain softmax scores of the
        # chosen experts, as in the project's `none` strategy.
        config = Qwen3MoeConfig(hidden_size=d, num_experts=E, num_experts_per_tok=layer.balancer.top_k,
                                moe_intermediate_size=two_h // 2, norm_topk_prob=False, hidden_act="silu",
                                experts_implementation=impl)
        block = Qwen3MoeSparseMoeBlock(config).to(layer.router.weight.device)
        if block.gate.weight.is_cuda:
            # Under autocast their grouped_mm casts the input to the weights'
            # dtype; with fp32 weights torch would take its slow fp32 loop.
            # bf16 weights, as Hugging Face models are trained on GPUs, get
            # the fast kernel.
            block.to(torch.bfloat16)
        block.gate = Fp32Router(block.gate)      # fp32 again, before the weights are copied in
        with torch.no_grad():   # they store [E, out, in]; the project stores [E, in, out]
            block.gate.router.weight.copy_(layer.router.weight)
            block.experts.gate_up_proj.copy_(layer.experts.w13.transpose(1, 2))
            block.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))
        peers[f"hf_qwen3_moe_{impl}"] = block
    return peers, None


def bench_peers(sizes, warmup, repeats, device, bf16=None):
    """Forward+backward of the project's MoE layer (strategy `none`) and of
    every peer, for each size in `sizes`, under bf16 autocast if `bf16`
    (default: on CUDA, as training runs there; gpu_check's CPU dry run asks
    for it on the CPU too). Returns the figures and, if the Hugging Face
    peers could not be built, why."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    results, skipped = {}, None
    for size_name, size in sizes.items():
        cfg = GPTConfig(d_model=size["d_model"], n_experts=size["n_experts"], top_k=size["top_k"],
                        d_expert=size["d_expert"], n_heads=1, balancer="none")
        torch.manual_seed(0)
        layer = MoELayer(cfg).to(device).train()
        x = torch.randn(1, size["tokens"], cfg.d_model, device=device)
        grad = torch.randn_like(x)
        hf, skipped = hf_peers(layer)
        peers = {"mask_loop": MaskLoopMoE(layer).to(device), **hf}

        def fwd_bwd(module, project):
            xi = x.detach().requires_grad_()
            for p in module.parameters():
                p.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                y = module(xi)[0] if project else module(xi)
            y.backward(grad)
            return y.detach().float(), xi.grad

        fns = {"project": lambda: fwd_bwd(layer, True),
               **{name: functools.partial(fwd_bwd, module, False) for name, module in peers.items()}}
        # Same weights, same tokens, same routing: same outputs and input
        # gradients, up to the order of float sums (and bf16 rounding under
        # autocast).
        ref = fns["project"]()
        diffs = {name: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fns[name](), ref))
                 for name in peers}
        tolerance = 2e-2 if bf16 else 1e-4
        for name, diff in diffs.items():
            if not diff <= tolerance:
                raise RuntimeError(f"peer {name} at size {size_name}: output differs from the project's "
                                   f"by {diff:.2e} of its largest value (tolerance {tolerance:.0e})")
        n = repeats[size_name] if isinstance(repeats, dict) else repeats
        times = interleaved(fns, warmup, n, device)
        layer.load.zero_()
        results[size_name] = {
            "config": size, "repeats": n, "autocast": "bf16" if bf16 else "off",
            "project_ms": 1e3 * statistics.median(times["project"]),
            "against": {name: {"ms": 1e3 * statistics.median(times[name]),
                               "peer_over_project": median_ratio(times[name], times["project"]),
                               "max_rel_diff": diffs[name]} for name in peers}}
    return results, skipped


# ----------------------------------------------------------------------------
# 6. The experts on CPU: the loop or the grouped way, by shape.
#
# The two ways compute the same bits (tests/test_moe.py); which one is faster
# depends on the shape, and plumbing.kernels.grouped_is_faster_on_cpu picks by a rule.
# This measures both ways on rows already routed and sorted, and whether the
# rule picked the faster one.

EXPERT_SHAPES = [   # (d_model, experts, top_k, d_expert, tokens): 64 to 512 rows per expert
    (64, 8, 2, 64, 512), (64, 8, 2, 64, 1024), (128, 16, 2, 128, 512), (128, 16, 2, 128, 1024),
    (128, 16, 2, 128, 2048), (128, 16, 2, 128, 4096), (128, 64, 2, 128, 2048), (128, 64, 2, 128, 8192),
    (256, 16, 2, 256, 2048), (512, 64, 8, 256, 1024), (512, 64, 8, 256, 2048), (512, 64, 8, 256, 4096)]


def bench_grouped_vs_loop(shapes, warmup, repeats):
    results = {}
    for d, E, k, h, tokens in shapes:
        torch.manual_seed(0)
        layer = MoELayer(GPTConfig(d_model=d, n_experts=E, top_k=k, d_expert=h, n_heads=1, balancer="none"))
        x = torch.randn(tokens, d)
        with torch.no_grad():
            r = layer.balancer.route(layer.router(x.view(1, tokens, d)))
        counts = torch.bincount(r.expert_idx, minlength=E).tolist()
        rows = x.index_select(0, r.token_idx[torch.argsort(r.expert_idx, stable=True)]).requires_grad_()
        grad = torch.randn_like(rows)
        w13, w2 = layer.experts.w13, layer.experts.w2

        def fwd_bwd(run):
            for p in (rows, w13, w2):
                p.grad = None
            run(rows, counts).backward(grad)

        times = interleaved({"loop": lambda: fwd_bwd(layer.experts.forward_loop),
                             "grouped": lambda: fwd_bwd(lambda x, c: grouped_experts_cpu(x, c, w13, w2))},
                            warmup, repeats, torch.device("cpu"))
        loop_over_grouped = median_ratio(times["loop"], times["grouped"])
        rule = "grouped" if grouped_is_faster_on_cpu(rows, counts, w13, w2) else "loop"
        results[f"d{d}_e{E}_top{k}_h{h}_t{tokens}"] = {
            "rows_per_expert": tokens * k / E, "block": tokens * k / E * h,
            "loop_ms": 1e3 * statistics.median(times["loop"]),
            "grouped_ms": 1e3 * statistics.median(times["grouped"]),
            "loop_over_grouped": loop_over_grouped, "rule_picks": rule,
            # time of the way the rule picked over the faster way's: 1.0 when it picked the faster
            "rule_over_best": max(1.0, 1 / loop_over_grouped) if rule == "grouped" else max(1.0, loop_over_grouped)}
    return results


# ----------------------------------------------------------------------------
# Report.

def machine_info(device, threads):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def print_report(r):
    m = r["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
          f"{m['device']} | load average {r['load_before']:.2f} before, {r['load_after']:.2f} after")
    c = r["config"]
    print(f"preset {c['preset']}: {c['n_layers']} layers, d_model {c['d_model']}, {c['n_experts']} experts "
          f"top-{c['top_k']}, d_expert {c['d_expert']}, {c['tokens_per_step']} tokens per step\n")
    print("MoE layer forward+backward vs dense SwiGLU of hidden width top_k * d_expert")
    print(f"  {'strategy':15s} {'MoE ms':>8s} {'dense ms':>9s} {'MoE/dense':>10s} {'routing/dense':>14s} "
          f"{'experts/dense':>14s}")
    for name, x in r["layers"].items():
        note = "" if name in TOKEN_CHOICE else "  (expert choice)"
        print(f"  {name:15s} {x['moe_ms']:8.2f} {x['dense_ms']:9.2f} {x['moe_over_dense']:10.3f} "
              f"{x['routing_over_dense']:14.3f} {x['experts_over_dense']:14.3f}{note}")
    print("  (parts of MoE/dense -- routing: the router and the strategy's route() and loss();\n"
          "   experts: the expert matmuls and activation on rows already sorted and gathered)")
    t = r["train_step"]
    print(f"\ntraining step ({c['balancer']}): {t['step_ms']:.1f} ms, {t['tokens_per_s']:.0f} tokens/s, "
          f"{t['model_gflop_per_step']:.2f} GFLOP/step = {t['achieved_gflops']:.1f} GFLOP/s")
    print(f"matmul peak ({t['matmul_size']}^2 {t['matmul_dtype']}): {t['matmul_peak_gflops']:.1f} GFLOP/s "
          f"(median; best {t['matmul_best_gflops']:.1f})  ->  MFU {t['mfu']:.3f}")
    if "ep" in r:
        e = r["ep"]
        one, two = e["one_process"], e["two_processes"]
        print(f"\nexpert parallel, same global batch: 1 process x {one['threads_per_process']} threads "
              f"{one['tokens_per_s']:.0f} tokens/s | 2 processes x {two['threads_per_process']} thread "
              f"{two['tokens_per_s']:.0f} tokens/s | ratio {e['ep2_over_ep1']:.3f} | "
              f"all-to-all {100 * e['all_to_all_share']:.1f}% of the step")
    if "experts_scaling" in r:
        print("\nexperts at fixed active parameters: " + " | ".join(
            f"{e}: {x['step_ms']:.1f} ms ({x['over_first']:.2f}x)" for e, x in r["experts_scaling"].items()))
        print("tokens per step: " + " | ".join(
            f"{n}: {x['step_ms']:.1f} ms ({x['tokens_per_s']:.0f} tok/s)" for n, x in r["tokens_scaling"].items()))
    mem = r["peak_memory_mb"]
    print("\npeak memory (MB): " + ", ".join(
        f"{k} {v:.0f}" if isinstance(v, (int, float)) else f"{k} {'/'.join(f'{x:.0f}' for x in v)}"
        for k, v in mem.items()))
    print("\nheadline: " + ", ".join(f"{k} {v:.3f}" for k, v in r["headline"].items()))


def print_peers(r):
    m = r["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
          f"{m['device']} | load average {r['load_before']:.2f} before, {r['load_after']:.2f} after")
    print("MoE layer forward+backward, same weights and tokens: each peer's time over the project's "
          "(median of interleaved rounds; above 1 the project is faster)")
    for size, x in r["peers"].items():
        c = x["config"]
        print(f"  {size}: d_model {c['d_model']}, {c['n_experts']} experts top-{c['top_k']}, d_expert "
              f"{c['d_expert']}, {c['tokens']} tokens, {x['repeats']} rounds | project {x['project_ms']:.1f} ms")
        for name, p in x["against"].items():
            print(f"    {name:26s} {p['ms']:9.1f} ms  {p['peer_over_project']:6.3f}x   "
                  f"(outputs differ by {p['max_rel_diff']:.0e} of their largest value)")
    print("\nheadline: " + ", ".join(f"{k} {v:.3f}" for k, v in r["headline"].items()))


MAX_REPEATS = 100_000     # a bound on typos: 1e9 repeats would run for years


# ----------------------------------------------------------------------------
# 7. Checkpoint memory: does any rank ever hold more than its own experts?

# Experts big enough to stand out of the process's own noise: 16 experts of
# 1.5 MB in each of 2 layers, 144 MB of expert state with AdamW's moments
# (MB here are 2**20 bytes).
CKPT_MODEL = ["--preset", "tiny", "--n-layers", "2", "--d-model", "256", "--n-experts", "16", "--d-expert", "512"]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident set size while the block runs, above where it
    started, sampled every millisecond by a thread (ru_maxrss would also
    count whatever the process did before)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def watch(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.end = rss_bytes()
        self.peak = max(self.peak, self.end)


def expert_state_bytes(model):
    """This rank's expert weights and their two AdamW moments, in bytes."""
    return 3 * sum(p.numel() * p.element_size() for n, p in model.named_parameters() if is_expert_param(n))


def ckpt_worker(rank, world_size, ep_size, folder, load):
    """One rank: a checkpoint of a model whose AdamW moments exist (one step
    of zero gradients makes them), or a resume from it, measured."""
    args = train.parse_args([*CKPT_MODEL, "--ep-size", str(ep_size)])
    proc = plumbing.Proc(rank, world_size, torch.device("cpu")).start(ep_size)
    model, opt = train.build(args, proc)
    index = Path(folder) / "ckpt.pt"
    if load:
        ckpt = plumbing.read_checkpoint(index)
        gc.collect()
        with PeakRSS() as m:
            plumbing.load_checkpoint(ckpt, model, opt, proc)
    else:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        meta = {"config": dataclasses.asdict(plumbing.model_config(args))}
        with PeakRSS() as m:
            plumbing.save_checkpoint(index, model, opt, 1, meta, proc)
    return {"rise_mb": (m.peak - m.start) / 2**20, "kept_mb": (m.end - m.start) / 2**20,
            "own_expert_state_mb": expert_state_bytes(model) / 2**20}


# (name, processes, ep size, resume?, folder): save on 4 processes at ep 4,
# at 2 x 2 and on 1 process; resume the first on 4, 2 and 1, and the others
# on 4 at ep 4. dcp reads each stored shard whole before it keeps the rows a
# rank needs, so resuming from fewer, larger shards costs a rank, for a
# moment, a stored shard of one tensor (from 1 process: one whole tensor).
CKPT_CASES = (("save 4 ranks ep 4", 4, 4, False, "a"), ("save 4 ranks 2x2", 4, 2, False, "b"),
              ("save 1 process", 1, 1, False, "c"),
              ("resume 4 ranks ep 4", 4, 4, True, "a"), ("resume 2 ranks ep 2", 2, 2, True, "a"),
              ("resume 1 process", 1, 1, True, "a"),
              ("resume 4 ranks ep 4 from 2x2", 4, 4, True, "b"), ("resume 4 ranks ep 4 from 1", 4, 4, True, "c"))


def bench_checkpoint_memory(cases=CKPT_CASES):
    model = GPT(plumbing.model_config(train.parse_args(CKPT_MODEL)))
    whole = expert_state_bytes(model) / 2**20
    largest = max(p.numel() * p.element_size() for n, p in model.named_parameters() if is_expert_param(n)) / 2**20
    report = {"all_expert_state_mb": whole, "largest_expert_tensor_mb": largest, "model_flags": " ".join(CKPT_MODEL),
              "runs": {}}
    print(f"how far each rank's resident memory rises while it saves or resumes; all experts' state "
          f"(weights and AdamW moments) is {whole:.0f} MB, the largest expert tensor {largest:.0f} MB\n"
          f"  (train.py {' '.join(CKPT_MODEL)})")
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, ep, load, folder in cases:
            if world == 1:
                ranks = [ckpt_worker(0, 1, 1, Path(tmp) / folder, load)]
            else:
                ranks = plumbing.spawn(ckpt_worker, world, ep, str(Path(tmp) / folder), load, timeout=300)
            report["runs"][name] = ranks
            print(f"  {name:28s} " + " | ".join(f"rank {r}: +{x['rise_mb']:.0f} MB (own experts "
                                               f"{x['own_expert_state_mb']:.0f})" for r, x in enumerate(ranks)),
                  flush=True)
    distributed = [x for ranks in report["runs"].values() if len(ranks) > 1 for x in ranks]
    report["headline"] = {
        "worst_rise_over_own_expert_state": max(x["rise_mb"] / x["own_expert_state_mb"] for x in distributed),
        "worst_rise_over_all_expert_state": max(x["rise_mb"] for x in distributed) / whole}
    return report


def run_checkpoint_memory(report, args, t_start):
    """`--checkpoint-memory`: each rank's memory while saving and resuming."""
    report["checkpoint_memory"] = r = bench_checkpoint_memory()
    report["load_after"] = load_average()
    report["wall_time_s"] = time.time() - t_start
    report["headline"] = r["headline"]
    print("\nheadline: " + ", ".join(f"{k} {v:.3f}" for k, v in report["headline"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def parse_args(argv=None):
    p = plumbing.OneLineParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.prog = "python -m lab.bench"   # what --help and errors call it: it runs as a module
    p.add_argument("--quick", action="store_true", help="only moe_over_dense and mfu (under a minute)")
    p.add_argument("--peers", action="store_true",
                   help="only the MoE layer against Hugging Face's Qwen3-MoE block and a textbook mask loop, "
                        "at the preset's size and a large one (pip install transformers for the former)")
    p.add_argument("--grouped-vs-loop", action="store_true",
                   help="only the experts on CPU by the loop and by the grouped way over 12 shapes, and which "
                        "one moe.py's rule picks (about a minute)")
    p.add_argument("--checkpoint-memory", action="store_true",
                   help="only each rank's memory while saving a 4-process checkpoint and resuming it on 4, 2 "
                        "and 1 processes (about a minute)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--preset", default="default", choices=list(train.PRESETS),
                   help="model and batch sizes (default: default; tiny: a smoke run in seconds)")
    p.add_argument("--balancer", default="lossfree", choices=STRATEGIES,
                   help="strategy of the training-step measurements (default: lossfree)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads of this process (default: %(default)s, torch's); the expert-parallel runs "
                        "share the same total")
    p.add_argument("--repeats", type=int,
                   help="timed repeats of each layer (default: 40, 5 with --preset tiny); training steps get a quarter as many")
    p.add_argument("--warmup", type=int, help="untimed repeats first (default: 3, 1 with --preset tiny)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="default: cpu (the expert-parallel runs are always CPU/gloo)")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"
    args.repeats = args.repeats if args.repeats is not None else (5 if tiny else 40)   # 0 is an error, not the default
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    cpus = os.cpu_count() or 1
    if not 1 <= args.repeats <= MAX_REPEATS or not 0 <= args.warmup <= MAX_REPEATS:
        p.error(f"--repeats must be 1 to {MAX_REPEATS}, --warmup 0 to {MAX_REPEATS}")
    if not 1 <= args.threads <= cpus:
        p.error(f"--threads must be 1 to {cpus}, the CPUs of this machine (got {args.threads})")
    if args.json:
        # Checked now, not after minutes of measuring whose figures would be lost.
        target, folder = Path(args.json), Path(args.json).parent
        if target.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            p.error(f"--json {args.json}: {'is a folder' if target.is_dir() else f'{folder} is not a writable folder'}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    tiny = args.preset == "tiny"
    corpus = random_corpus()
    cfg_args = make_args(args.preset, args.balancer)
    cfg = plumbing.model_config(cfg_args)
    report = {"command": " ".join(["python -m lab.bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
              "machine": machine_info(device, args.threads), "load_before": load_average(),
              "config": {"preset": args.preset, "balancer": args.balancer, "n_layers": cfg.n_layers,
                         "d_model": cfg.d_model, "n_experts": cfg.n_experts, "top_k": cfg.top_k,
                         "d_expert": cfg.d_expert, "seq_len": cfg.seq_len, "batch_size": cfg_args.batch_size,
                         "tokens_per_step": cfg_args.batch_size * cfg.seq_len},
              "repeats": args.repeats, "warmup": args.warmup}
    t_start = time.time()
    if args.peers:
        return run_peers(report, args, device, t_start)
    if args.grouped_vs_loop:
        return run_grouped_vs_loop(report, args, t_start)
    if args.checkpoint_memory:
        return run_checkpoint_memory(report, args, t_start)
    # Training steps are slower than a layer, so they get fewer repeats: a
    # quarter as many timed steps, in rounds of 3 steps of which 2 are timed.
    steps, rounds = max(1, args.repeats // 4), max(1, args.repeats // 8)

    report["train_step"] = bench_mfu(args.preset, args.balancer, corpus, 512 if tiny else 2048,
                                     args.warmup, rounds, device)
    report["layers"] = bench_layers(args.preset, STRATEGIES, args.warmup, args.repeats, device)
    report["moe_over_dense"] = {k: v["moe_over_dense"] for k, v in report["layers"].items()}
    report["mfu"] = report["train_step"]["mfu"]

    if not args.quick:
        report["ep"] = bench_ep(args.preset, args.balancer, args.threads, args.warmup, steps)
        report["ep2_over_ep1"] = report["ep"]["ep2_over_ep1"]
        report["all_to_all_share"] = report["ep"]["all_to_all_share"]
        # The expert-parallel processes are fresh and only train, so their peak
        # is the training step's own (plus the Python and torch baseline).
        report["peak_memory_mb"] = {
            "train_step_1_process": report["ep"]["one_process"]["peak_rss_mb_per_process"][0],
            "train_step_2_processes": report["ep"]["two_processes"]["peak_rss_mb_per_process"]}
        batch = cfg_args.batch_size
        report["experts_scaling"], report["tokens_scaling"] = bench_scaling(
            args.preset, args.balancer, corpus, EXPERT_COUNTS, [batch // 4, batch // 2, batch, 2 * batch],
            args.warmup, rounds, device)
    # This process ran everything above (up to 64 experts and twice the batch).
    report.setdefault("peak_memory_mb", {})["bench_process"] = peak_memory_mb(device)

    report["load_after"] = load_average()
    report["wall_time_s"] = time.time() - t_start
    headline = {"moe_over_dense_worst_token_choice": max(report["moe_over_dense"][s] for s in TOKEN_CHOICE),
                "mfu": report["mfu"]}
    if not args.quick:
        headline["ep2_over_ep1"] = report["ep2_over_ep1"]
        headline["experts_64_over_8"] = report["experts_scaling"]["64"]["over_first"]
    report["headline"] = headline
    report["targets"] = TARGETS
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_peers(report, args, device, t_start):
    """`--peers`: the comparison with other implementations, nothing else.
    The large size is slow (the peers' loops take seconds there), so it gets
    an eighth of the rounds, at least 3."""
    sizes = peer_sizes(args.preset)
    repeats = {name: args.repeats if name == args.preset else max(3, args.repeats // 8) for name in sizes}
    report["peers"], skipped = bench_peers(sizes, args.warmup, repeats, device)
    if skipped:
        print(skipped)
        report["peers_skipped"] = skipped
    report["load_after"] = load_average()
    report["wall_time_s"] = time.time() - t_start
    report["headline"] = {"peer_over_project_worst": min(
        p["peer_over_project"] for x in report["peers"].values() for p in x["against"].values())}
    report["targets"] = {"peer_over_project": TARGETS["peer_over_project"]}
    print_peers(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_grouped_vs_loop(report, args, t_start):
    """`--grouped-vs-loop`: the measurements behind the CPU experts' rule (plumbing.kernels)."""
    if not grouped_mm_on_cpu():
        print("this PyTorch has no torch._grouped_mm on CPU: the experts always take the loop; nothing to compare")
        return 0
    report["grouped_vs_loop"] = bench_grouped_vs_loop(EXPERT_SHAPES, args.warmup, max(3, args.repeats // 4))
    report["load_after"] = load_average()
    report["wall_time_s"] = time.time() - t_start
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']} | "
          f"load average {report['load_before']:.2f} before, {report['load_after']:.2f} after")
    print("experts forward+backward on CPU, rows already routed and sorted: loop time over grouped time "
          "(above 1 the grouped way is faster), and the way moe.py's rule picks")
    print(f"  {'shape':28s} {'rows/expert':>11s} {'rows x h':>9s} {'loop ms':>9s} {'grouped ms':>10s} "
          f"{'loop/grouped':>12s} {'rule':>8s} {'rule/best':>9s}")
    for name, x in report["grouped_vs_loop"].items():
        print(f"  {name:28s} {x['rows_per_expert']:11.0f} {x['block']:9.0f} {x['loop_ms']:9.2f} "
              f"{x['grouped_ms']:10.2f} {x['loop_over_grouped']:12.3f} {x['rule_picks']:>8s} {x['rule_over_best']:9.3f}")
    report["headline"] = {"rule_over_best_worst": max(x["rule_over_best"] for x in report["grouped_vs_loop"].values())}
    print("\nheadline: " + ", ".join(f"{k} {v:.3f}" for k, v in report["headline"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
