"""
train.py -- train the MoE GPT with one balancing strategy and measure what
the papers measure.

    python train.py --balancer lossfree                       # one process
    torchrun --nproc_per_node=2 train.py --balancer lossfree  # expert parallel
    torchrun --nproc_per_node=4 train.py --ep-size 2          # 2 replicas x 2 expert-parallel ranks

Read it top to bottom:
  1. settings: presets, flags (a strategy's flags come from BalanceConfig),
     and their checks
  2. build: the model and its optimizer
  3. train_step: micro-steps, gradient sync, clipping, AdamW, then the
     strategy's once-per-step hook
  4. evaluate: perplexity per domain, MaxVio, expert specialisation per
     domain, and the causality probe
  5. the loop

The global batch (--batch-size sequences) is the unit of everything: the data,
the balancing statistics and the optimizer step are defined on it, and the
number of processes and --grad-accum only decide how it is cut up. So the
same seed gives the same loss curve on 1 or 2 processes. Checkpoints, the log,
signals and process exit are in plumbing.py: needed, but not the lesson.
"""

import math
import os
import time
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

import plumbing
from balancers import BALANCERS, BalanceConfig
from data import VOCAB_SIZE, fingerprint, get_batch, load_corpus, val_batches
from moe import GPT, GPTConfig, causal_logits, check_config, clip_grad_norm, sync_gradients

# ----------------------------------------------------------------------------
# 1. Settings.

# tiny: seconds, for tests and smoke runs. default: shows the papers' effects
# in a few minutes on a 2-core CPU. Any explicit flag overrides the preset.
# The lossfree bias moves by u = 1e-3 per optimizer step, so balance is a
# matter of steps, not tokens: the default takes many small steps.
PRESETS = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_experts=8, top_k=2, d_expert=64,
                 shared_experts=0, seq_len=64, batch_size=8, steps=20, lr=3e-3, warmup=5, eval_every=0,
                 log_every=1, val_seqs=8, ckpt_every=10),
    "default": dict(n_layers=4, d_model=128, n_heads=4, n_experts=16, top_k=2, d_expert=128,
                    shared_experts=0, seq_len=128, batch_size=16, steps=1000, lr=2e-3, warmup=50,
                    eval_every=250, log_every=10, val_seqs=512, ckpt_every=100),
    # One GPU for minutes (an estimate: not yet run on a GPU): the DeepSeekMoE
    # shape of Wang et al.'s runs, 64 routed experts top-6 plus 2 shared, on
    # 33M tokens (2000 steps of 64 x 256 bytes, about 7 passes over the
    # built-in corpus: use --data for longer runs). Widths are multiples of 8
    # and there are fewer than 1024 experts, so on Hopper the experts take
    # the grouped bf16 kernel.
    "gpu": dict(n_layers=8, d_model=512, n_heads=8, n_experts=64, top_k=6, d_expert=256,
                shared_experts=2, seq_len=256, batch_size=64, steps=2000, lr=1e-3, warmup=100,
                eval_every=500, log_every=10, val_seqs=512, ckpt_every=500),
}

# Every numeric flag and the smallest value it may take; floats must also be
# finite. (A strategy's knobs carry their ranges in balancers.BalanceConfig.)
AT_LEAST = dict(n_layers=1, d_model=1, n_heads=1, n_experts=1, top_k=1, d_expert=1, shared_experts=0,
                steps=1, batch_size=1, grad_accum=1, domain_block=1, seq_len=1, warmup=0, seed=0,
                eval_every=0, log_every=1, val_seqs=1, ckpt_every=1, weight_decay=0.0)
ABOVE = dict(lr=0.0, grad_clip=0.0)
# and the largest: torch.manual_seed takes an unsigned 64-bit seed
AT_MOST = dict(seed=2**64 - 1)


def parse_args(argv=None):
    p = plumbing.OneLineParser(
        description="Train a small MoE GPT with one load-balancing strategy and report perplexity, "
                    "MaxVio, expert specialisation per domain and the causality leak.")
    p.add_argument("--balancer", default="lossfree", choices=list(BALANCERS), metavar="NAME",
                   help=" | ".join(f"{n}: {c.summary}" for n, c in BALANCERS.items()) + " (default: lossfree)")
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="sizes and schedule; explicit flags override it (default: default)")

    def preset_flag(group, name, type, help):
        group.add_argument("--" + name.replace("_", "-"), type=type, metavar="N" if type is int else "X",
                           help=f"{help} (default: {plumbing.preset_help(PRESETS, name)})")
    g = p.add_argument_group("model")
    preset_flag(g, "n_layers", int, "transformer blocks")
    preset_flag(g, "d_model", int, "width of the residual stream")
    preset_flag(g, "n_heads", int, "attention heads")
    preset_flag(g, "n_experts", int, "routed experts per MoE layer")
    preset_flag(g, "top_k", int, "experts per token (token-choice strategies)")
    preset_flag(g, "d_expert", int, "hidden width of each expert")
    preset_flag(g, "shared_experts", int, "always-on experts, DeepSeekMoE")
    g = p.add_argument_group("training")
    preset_flag(g, "steps", int, "optimizer steps")
    preset_flag(g, "batch_size", int, "GLOBAL batch in sequences; processes and --grad-accum split it")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-steps per optimizer step (default: 1)")
    g.add_argument("--domain-block", type=int, default=1, metavar="S",
                   help="draw every S consecutive sequences from one domain; S = --balance-seqs makes every "
                        "balance group single-domain, Qiu et al.'s setting (default: 1)")
    preset_flag(g, "seq_len", int, "bytes per sequence")
    preset_flag(g, "lr", float, "peak learning rate (warm-up, then cosine to 10%%)")
    preset_flag(g, "warmup", int, "warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1, metavar="X", help="AdamW weight decay (default: 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, metavar="X", help="clip the global gradient norm to this (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="initialisation and batches (default: 0)")
    g.add_argument("--data", metavar="DIR", help="your own text: one domain per subfolder (or per file) "
                                                 "(default: the built-in corpus)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if this PyTorch sees a GPU, else CPU (default: auto)")
    g.add_argument("--ep-size", type=int, metavar="N",
                   help="processes that share the experts out and exchange tokens (an expert-parallel group); "
                        "the world size / N such groups hold copies of the experts (data parallel). Must "
                        "divide the number of processes and --n-experts (default: all processes)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="log.jsonl, summary.json and the checkpoint (ckpt.pt, an index, and its folder ckpt/) go here "
                        "(default: runs/BALANCER)")
    either = g.add_mutually_exclusive_group()     # "continue" and "start over" cannot both be meant
    either.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                        help="continue from OUT/ckpt.pt; --resume auto: continue if OUT holds a checkpoint, "
                             "start if it holds nothing (for torchrun --max-restarts)")
    either.add_argument("--overwrite", action="store_true", help="start over even if OUT holds a run")
    g.add_argument("--stop-at", type=int, default=-1, metavar="N",
                   help="stop after step N with a checkpoint, as if interrupted (continue with --resume)")
    preset_flag(g, "eval_every", int, "evaluate every N steps (0: only at the end)")
    preset_flag(g, "log_every", int, "write a log.jsonl line every N steps")
    preset_flag(g, "ckpt_every", int, "write a checkpoint every N steps (and at every evaluation and the end)")
    preset_flag(g, "val_seqs", int, "validation windows per domain (the whole split if it has fewer)")
    g = p.add_argument_group("strategy knobs (each strategy reads only its own; balancers.py)")
    for f in fields(BalanceConfig):
        kind = f.metadata["type"]
        flag = "--" + f.name.replace("_", "-")
        extra = dict(action="store_const", const=True) if kind is bool else \
            dict(type=kind, choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else "N" if kind is int else "X")
        g.add_argument(flag, **extra, help=f"{f.metadata['help']} (default: {plumbing.knob_help(f.name)})")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join("runs", args.balancer)
    return args


def balance_config(args):
    return BalanceConfig(**{f.name: getattr(args, f.name) for f in fields(BalanceConfig)})


def model_config(args):
    return GPTConfig(seq_len=args.seq_len, n_layers=args.n_layers, d_model=args.d_model,
                     n_heads=args.n_heads, n_experts=args.n_experts, top_k=args.top_k,
                     d_expert=args.d_expert, shared_experts=args.shared_experts,
                     balancer=args.balancer, balance=balance_config(args))


# The flags that decide what is trained, beyond the model (whose settings
# the checkpoint's config holds): a resume with any of them changed would
# continue a run that matches neither set of flags. The others only decide
# what is written and when (--log-every, --stop-at, --steps raised, --out).
TRAJECTORY = ("batch_size", "seed", "lr", "warmup", "grad_accum", "domain_block", "weight_decay", "grad_clip")


def flag(name):
    return "--" + name.replace("_", "-")


def trajectory(args, corpus):
    """The trajectory flags, the data folder and the corpus's fingerprint."""
    return {**{flag(k): getattr(args, k) for k in TRAJECTORY},
            "--data": os.path.abspath(args.data) if args.data else None, "corpus": fingerprint(corpus)}


def same_everywhere(args, corpus):
    """What every process of one run must share: every flag (the data
    folder by its contents, since machines may mount it at different paths)."""
    return {**{flag(k): v for k, v in vars(args).items() if k != "data"},
            "the data (corpus fingerprint)": fingerprint(corpus)}


def check_resumable(ckpt, cfg, traj, path):
    """--resume continues a run only under the flags that made it: the first
    difference is named with its old and new value."""
    if "run_id" not in ckpt or "trajectory" not in ckpt:
        raise ValueError(f"--resume: {path} was written by an older train.py (no run id or trajectory flags); "
                         f"start over with --overwrite or use another --out")
    flat = lambda c: {**{flag(k): v for k, v in c.items() if k != "balance"},
                      **{flag(k): v for k, v in c.get("balance", {}).items()}}
    old, new = flat(ckpt["config"]), flat(asdict(cfg))
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            raise ValueError(f"--resume: {path} was made with a different model or strategy ({name} was "
                             f"{old.get(name)}, now {new.get(name)}); use the same flags or another --out")
    for name, value in traj.items():
        then = ckpt["trajectory"].get(name)
        if then != value:
            if name == "corpus":
                raise ValueError(f"--resume: the training data changed since {path} was written (corpus "
                                 f"fingerprint {then}, now {value}): restore it, or start over with --overwrite")
            raise ValueError(f"--resume: {path} was trained with {name} {then}, this run has {value}: resume "
                             f"with the same value, or start over with --overwrite or another --out")


def check_args(args, world_size, device=None):
    """Every flag in one place: a message that names the flag and the fix."""
    for name, low in AT_LEAST.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < low:
            raise ValueError(f"{flag(name)} must be a number >= {low} (got {value})")
    for name, low in ABOVE.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value <= low:
            raise ValueError(f"{flag(name)} must be a finite number > {low} (got {value})")
    for name, high in AT_MOST.items():
        if getattr(args, name) > high:
            raise ValueError(f"{flag(name)} must be at most {high} (got {getattr(args, name)})")
    if args.stop_at != -1 and args.stop_at < 1:
        raise ValueError(f"--stop-at must be a step >= 1 (got {args.stop_at})")
    ep_size = expert_parallel_size(args, world_size)
    split = world_size * args.grad_accum
    if args.batch_size % split:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by processes x --grad-accum = {split}: "
                         f"use a multiple of {split}")
    if args.batch_size % args.domain_block:
        raise ValueError(f"--domain-block {args.domain_block} must divide --batch-size {args.batch_size}")
    cfg = model_config(args)
    check_config(cfg, ep_size, local_seqs=args.batch_size // split)
    plumbing.check_memory(cfg, args.batch_size // split, ep_size, device)   # experts are split ep_size ways


def expert_parallel_size(args, world_size):
    """--ep-size, checked against the world size (the default: all processes)."""
    if args.ep_size is None:
        return world_size
    if args.ep_size < 1 or world_size % args.ep_size:
        raise ValueError(f"--ep-size {args.ep_size} must divide the {world_size} processes "
                         f"(each expert-parallel group is --ep-size of them)")
    return args.ep_size


# ----------------------------------------------------------------------------
# 2. Build: the model and its optimizer.

def build(args, proc):
    """The model (this rank's experts, everything else replicated) and AdamW.
    Seeded first, so every rank and every mesh starts from the same weights.
    bench.py and the tests build through here too."""
    torch.manual_seed(args.seed)
    model = GPT(model_config(args), proc.mesh).to(proc.device)
    return model, make_optimizer(model, args)


def make_optimizer(model, args):
    """AdamW; no weight decay on norms and biases (1-D tensors).

    fused=True runs the whole update of all parameters in one kernel per
    group instead of a dozen elementwise ops per tensor. It matters for MoE:
    the optimizer touches every expert each step, active or not, so its
    cost grows with the number of experts while the MoE layer's does not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(device):
    """bf16 autocast on CUDA (the router keeps fp32 itself); plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------
# 3. One optimizer step.

def train_step(model, opt, corpus, step, args, proc):
    """One optimizer step over the global batch of `step`.

    Each micro-step's loss is divided by grad_accum so the gradients add up to
    those of the mean over the rank's share; sync_gradients then averages over
    ranks. The strategy's step() runs exactly once, after the optimizer: the
    lossfree bias learns from the batch just trained on, never the next one."""
    model.train()
    lm_sum = torch.zeros((), device=proc.device)
    bal_sum = torch.zeros((), device=proc.device)
    for micro in range(args.grad_accum):
        x, y, _ = get_batch(corpus, step, args.seed, args.batch_size, args.seq_len,
                            proc.rank, proc.world_size, micro, args.grad_accum, args.domain_block)
        x, y = x.to(proc.device), y.to(proc.device)
        with autocast(proc.device):
            out = model(x, y)
        ((out.lm_loss + out.balance_loss) / args.grad_accum).backward()
        lm_sum += out.lm_loss.detach() / args.grad_accum
        bal_sum += out.balance_loss.detach() / args.grad_accum
    sync_gradients(model)
    grad_norm = clip_grad_norm(model, args.grad_clip).item()
    if not math.isfinite(grad_norm):
        # Stop before the update: a NaN gradient applied once makes every
        # weight NaN, while the loss still looks fine for one more step.
        raise FloatingPointError(f"the gradient norm became {grad_norm} at step {step + 1}, not applied")
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loads = model.end_step()                                   # [layers, E], global batch
    losses = proc.all_reduce(torch.stack([lm_sum, bal_sum])) / proc.world_size
    return {"loss": losses[0].item(), "balance_loss": losses[1].item(),
            "grad_norm": grad_norm, "lr": lr_at(step, args),
            "maxvio_batch": max_violation(loads).mean().item(),
            "maxvio_batch_by_layer": max_violation(loads).tolist()}


# ----------------------------------------------------------------------------
# 4. Evaluation: the papers' measurements.

def max_violation(load):
    """MaxVio = (max_i Load_i - mean Load) / mean Load (Wang et al. 2024, Eq. 4).
    load: [..., E] counts; returns [...]. 0 is perfect balance; E-1 means one
    expert took everything (with k = 1)."""
    load = load.float()
    mean = load.mean(-1)
    return (load.max(-1).values - mean) / mean.clamp(min=1e-9)


def specialization_score(freq):
    """Domain specificity of routing, in [0, 1).

    freq[l, d, e] is how often expert e is among the selections of a token of
    domain d in layer l (Qiu et al. 2025, Fig. 1b). Normalise each row to a
    distribution over experts, and take the total-variation distance between
    a domain's distribution and the all-domain average, averaged over domains
    and layers. 0: every domain uses the experts in the same proportions (what
    micro-batch balancing enforces); larger: experts serve particular domains.
    Comparing with the all-domain average rather than with uniform means a
    collapsed router scores 0, not high: imbalance is not specialisation."""
    dist_ = freq / freq.sum(-1, keepdim=True).clamp(min=1e-9)
    mean = dist_.mean(1, keepdim=True)
    return (0.5 * (dist_ - mean).abs().sum(-1)).mean().item()


@torch.no_grad()
def causal_probe(model, x, t, generator):
    """How much do outputs at positions <= t move when the tokens after t change?

    A causal language model must answer exactly 0. Token-choice routing is
    per token, so it does; expert choice compares tokens of the whole routing
    group, later ones included, so it does not (Wang et al. 2024, Sec. 5.2).
    Returns the max |change| of the logits at positions <= t."""
    model.eval()
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, model.cfg.vocab_size, x2[:, t + 1:].shape, generator=generator).to(x.device)
    a = model(x).logits[:, :t + 1].float()
    b = model(x2).logits[:, :t + 1].float()
    return (a - b).abs().max().item()


def computation_batch_maxvio(seq_load):
    """MaxVio over computation batches of S sequences (Wang et al. 2024,
    Sec. 5.1 and Fig. 5), for S = 1, 2, 4, ... and the whole set.

    seq_load[l, n, e]: assignments to expert e of layer l by validation
    sequence n, in the validation order (which mixes domains as training
    batches do). A computation batch is what one expert-parallel step sees
    at once, micro-batch x data-parallel ranks; here S consecutive sequences.
    For each S: MaxVio of every batch of S (the remainder that does not fill
    one is left out), averaged over batches and layers. At S = the whole set
    this is MaxVio_global. Returns {"sizes": [...], "maxvio": [...]}."""
    L, N, E = seq_load.shape
    sizes = [1 << i for i in range(N.bit_length()) if 1 << i < N] + [N]
    maxvio = [max_violation(seq_load[:, :N // S * S].reshape(L, N // S, S, E).sum(2)).mean().item() for S in sizes]
    return {"sizes": sizes, "maxvio": maxvio}


# Windows that the causal evaluation of expert choice covers: the first
# CAUSAL_BATCHES validation batches (each mixes the domains). It costs one
# forward per prefix length, seq_len forwards per batch, so not the whole set.
CAUSAL_BATCHES = 4


@torch.no_grad()
def causal_evaluation(model, batches, proc):
    """An expert-choice model's loss as generation would see it, beside its
    teacher-forced loss on the same windows.

    Teacher forcing routes position t in a group that holds the future of its
    sequence (Wang et al. 2024, Sec. 5.2: the leak "prevents reliable
    evaluation of the model performance"). moe.causal_logits computes
    position t from the prefix <= t alone, as generation must. For a
    token-choice model the two losses are equal. Returns both, in nats."""
    nll = torch.zeros(2, device=proc.device, dtype=torch.float64)
    tokens = torch.zeros((), device=proc.device, dtype=torch.float64)
    r, W = proc.rank, proc.world_size
    for x, y, _ in batches:
        b = x.shape[0] // W
        x, y = (t[r * b:(r + 1) * b].to(proc.device) for t in (x, y))
        with autocast(proc.device):
            logits = [causal_logits(model, x), model(x).logits]
        for i, lg in enumerate(logits):
            nll[i] += F.cross_entropy(lg.float().transpose(1, 2), y, reduction="sum").double()
        tokens += y.numel()
    proc.all_reduce(nll)
    proc.all_reduce(tokens)
    causal, forced = (nll / tokens).tolist()
    return {"val_loss_causal": causal, "val_loss_forced_same_windows": forced,
            "causal_windows": sum(x.shape[0] for x, _, _ in batches)}


@torch.no_grad()
def evaluate(model, corpus, batches, proc, causal_batches=CAUSAL_BATCHES):
    """Loss/perplexity per domain, MaxVio_global and over computation
    batches, specialisation and the leak, over the fixed validation set; for
    expert choice also the causal loss on the first `causal_batches` batches.
    Each rank takes its slice of every batch; sums are all-reduced, so the
    figures do not depend on the world size."""
    model.eval()
    cfg, D, r, W = model.cfg, len(corpus.domains), proc.rank, proc.world_size
    loss_sum = torch.zeros(D, device=proc.device, dtype=torch.float64)
    tok_sum = torch.zeros(D, device=proc.device, dtype=torch.float64)
    load = torch.zeros(cfg.n_layers, cfg.n_experts, device=proc.device, dtype=torch.long)
    picks = torch.zeros(cfg.n_layers, D, cfg.n_experts, device=proc.device, dtype=torch.long)
    n_seqs = sum(x.shape[0] for x, _, _ in batches)
    seq_load = torch.zeros(cfg.n_layers, n_seqs * cfg.n_experts, device=proc.device, dtype=torch.long)
    first = 0                                                   # the batch's first row in the validation set
    for x, y, dom in batches:
        b, rows = x.shape[0] // W, x.shape[0]
        x, y, dom = (t[r * b:(r + 1) * b].to(proc.device) for t in (x, y, dom))
        with autocast(proc.device):
            out = model(x)
        nll = F.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none")
        loss_sum.index_add_(0, dom, nll.sum(1).double())
        tok_sum.index_add_(0, dom, torch.full_like(dom, y.shape[1], dtype=torch.float64))
        tok_domain = dom.repeat_interleave(y.shape[1])                       # domain of every token
        for l, routing in enumerate(out.routings):
            load[l] += torch.bincount(routing.expert_idx, minlength=cfg.n_experts)
            cell = tok_domain[routing.token_idx] * cfg.n_experts + routing.expert_idx
            picks[l] += torch.bincount(cell, minlength=D * cfg.n_experts).view(D, cfg.n_experts)
            seq = first + r * b + routing.token_idx // y.shape[1]      # this rank's rows of the batch
            seq_load[l] += torch.bincount(seq * cfg.n_experts + routing.expert_idx, minlength=seq_load.shape[1])
        first += rows
    for t in (loss_sum, tok_sum, load, picks, seq_load):
        proc.all_reduce(t)
    freq = picks.double() / tok_sum.clamp(min=1)[None, :, None]
    x0 = batches[0][0]
    b = x0.shape[0] // W
    leak = torch.tensor(causal_probe(model, x0[r * b:(r + 1) * b].to(proc.device), x0.shape[1] // 2,
                                     torch.Generator().manual_seed(1234)), device=proc.device)
    proc.all_reduce(leak, "max")
    by_domain = (loss_sum / tok_sum.clamp(min=1)).tolist()
    val_loss = (loss_sum.sum() / tok_sum.sum()).item()
    mv = max_violation(load)
    causal = {} if BALANCERS[cfg.balancer].token_choice or not causal_batches else \
        causal_evaluation(model, batches[:causal_batches], proc)
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), **causal,
            "val_loss_by_domain": dict(zip(corpus.domains, by_domain)),
            "val_ppl_by_domain": {d: math.exp(v) for d, v in zip(corpus.domains, by_domain)},
            "val_tokens": int(tok_sum.sum().item()),
            "maxvio_global": mv.mean().item(), "maxvio_global_by_layer": mv.tolist(),
            "maxvio_computation_batch": computation_batch_maxvio(seq_load.view(cfg.n_layers, n_seqs, cfg.n_experts)),
            "specialization": specialization_score(freq),
            "expert_freq": freq.tolist(), "causal_leak": leak.item()}


def evaluation_line(step, ev):
    """What an evaluation during training prints above the progress bar."""
    return (f"step {step}: val loss {ev['val_loss']:.4f} | MaxVio_global {ev['maxvio_global']:.3f} | "
            f"specialisation {ev['specialization']:.3f}")


def against_unigram(val_loss, unigram, steps):
    """The final verdict in words: has the model learned more than byte
    frequencies? A model that has not is not broken when it is tiny or
    short-trained: it first learns the unigram, then context."""
    if val_loss < unigram:
        return (f"the model beats the unigram baseline by {unigram - val_loss:.3f} nats per byte: "
                f"it uses context, not just byte frequencies")
    return (f"the model is still {val_loss - unigram:.3f} nats per byte worse than the unigram baseline "
            f"(guessing from byte frequencies alone): expected for a tiny model or a short run "
            f"({steps} steps); train longer or use the default preset")


def unigram_loss(corpus):
    """Cross-entropy of the best context-free guess: the training byte
    frequencies, scored on the validation text. The model must beat it."""
    train = torch.cat(corpus.train).long()
    p = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1
    p = p / p.sum()
    val = torch.cat(corpus.val).long()
    return -p.log()[val].mean().item()


def summarize(args, cfg, model, corpus, history, ev, proc, wall_time):
    """summary.json: the run's final figures in one flat record."""
    tail = history[-max(1, len(history) // 10):]
    mean = lambda key, rows: sum(r[key] for r in rows) / max(1, len(rows))
    return {"balancer": args.balancer, "steps": args.steps, "world_size": proc.world_size, "seed": args.seed,
            "config": asdict(cfg), "strategy": asdict(BALANCERS[args.balancer].settings(cfg.balance)),
            "args": vars(args), "domains": corpus.domains, "domain_block": args.domain_block,
            "unigram_loss": unigram_loss(corpus), **ev,
            "maxvio_batch": mean("maxvio_batch", history),            # averaged over training
            "maxvio_batch_final": mean("maxvio_batch", tail),         # the last 10% of logged steps
            "tokens_per_second": mean("tokens_per_s", history), "wall_time_s": wall_time,
            "state": {k: v.tolist() for k, v in model.strategy_state().items()}}


# ----------------------------------------------------------------------------
# 5. The loop.

def main(argv=None):
    args = parse_args(argv)
    proc = plumbing.Proc.from_env(args.device)
    check_args(args, proc.world_size, proc.device)  # before the process group: bad flags stop every rank at once
    proc.start(args.ep_size)
    cfg = model_config(args)
    # The data before the output folder: a mistake in it costs nothing there.
    corpus = load_corpus(args.data, seq_len=args.seq_len, log=proc.log)
    proc.check_same_everywhere(same_everywhere(args, corpus))
    run = plumbing.open_run_dir(args.out, proc, args.resume, args.overwrite)
    try:
        return train(args, cfg, proc, run, corpus)
    finally:
        run.close()


def train(args, cfg, proc, run, corpus):
    model, opt = build(args, proc)
    step, wall = 0, 0.0
    meta = {"config": asdict(cfg), "args": vars(args), "run_id": plumbing.new_run_id(),
            "trajectory": trajectory(args, corpus)}
    if run.resume:
        ckpt = plumbing.read_checkpoint(run.ckpt)
        check_resumable(ckpt, cfg, meta["trajectory"], run.ckpt)
        if ckpt["step"] > args.steps:
            raise ValueError(f"--resume: {run.ckpt} is at step {ckpt['step']}, past --steps {args.steps}: "
                             f"give --steps {ckpt['step']} or more")
        if args.stop_at != -1 and args.stop_at <= ckpt["step"]:
            raise ValueError(f"--stop-at {args.stop_at}: {run.ckpt} is at step {ckpt['step']} already; "
                             f"give a later step")
        meta["run_id"] = ckpt["run_id"]
        # Finished means this run's summary was written too: a run that died
        # between its final checkpoint and summary.json (a full disk) gets it
        # now, from that checkpoint, without training. Rank 0 alone reads
        # summary.json, so it decides for all.
        done = proc.main and ckpt["step"] == args.steps and run.summary_run_id() == ckpt["run_id"]
        if proc.agree(done):
            proc.log(f"{args.out} finished all {ckpt['step']} steps already (see {run.summary}); nothing "
                     f"changed. To train further, raise --steps")
            return 0
        plumbing.load_checkpoint(ckpt, model, opt, proc)
        step, wall = ckpt["step"], ckpt.get("wall_time_s", 0.0)
    batches = val_batches(corpus, args.seq_len, args.batch_size // args.grad_accum, args.val_seqs)
    history = run.open_log(step, meta["run_id"])
    proc.log(f"{args.balancer} | {proc.world_size} process(es) on {proc.device} | {cfg.n_layers} layers, "
             f"{cfg.n_experts} experts top-{cfg.top_k}, {model.active_params() / 1e6:.2f}M active params | "
             f"unigram baseline val loss {unigram_loss(corpus):.3f}" + (f" | resuming at step {step}" if step else ""))

    stop = plumbing.StopFlag()
    bar = tqdm(total=args.steps, initial=step, desc=args.balancer, dynamic_ncols=True, disable=not proc.main)
    ev, t_start = {}, time.time()

    def save():
        plumbing.save_checkpoint(run.target("ckpt.pt"), model, opt, step,
                                 dict(meta, wall_time_s=wall + time.time() - t_start), proc)
        run.commit()                              # a new run replaces an old one at its first checkpoint
    try:
        while step < args.steps:
            t0 = time.time()
            try:
                rec = train_step(model, opt, corpus, step, args, proc)
            except FloatingPointError as e:
                kept = f"{run.ckpt} keeps the last good state" if run.target("ckpt.pt").exists() else \
                    "no checkpoint was written" + (f"; the run that was in {args.out} is untouched" if run.stage else "")
                raise FloatingPointError(f"{e}; {kept}. Try a lower --lr") from None
            rec["tokens_per_s"] = args.batch_size * args.seq_len / (time.time() - t0)
            step += 1
            state = model.strategy_state()
            if state:
                rec["state"] = {k: v.tolist() for k, v in state.items()}   # e.g. lossfree's bias trajectories
            final = step == args.steps
            if final or (args.eval_every and step % args.eval_every == 0):
                ev = evaluate(model, corpus, batches, proc)
                rec.update({k: v for k, v in ev.items() if k != "expert_freq"})
                if proc.main and not final:   # the final figures get their own lines below
                    bar.write(evaluation_line(step, ev))
            if final or step % args.log_every == 0 or "val_loss" in rec:
                rec = {"step": step, **rec}
                history.append(rec)
                run.append(rec)
            bar.update(1)
            bar.set_postfix_str(f"train loss {rec['loss']:.3f} | MaxVio_batch {rec['maxvio_batch']:.2f}")
            run.raise_if_failed()
            halt = proc.agree(stop.raised)
            if final or halt or step == args.stop_at or step % args.ckpt_every == 0 or "val_loss" in rec:
                save()
            if halt or step == args.stop_at:
                bar.close()
                proc.log(f"stopped at step {step}; {run.ckpt} saved. Continue with the same flags plus --resume")
                return 1 if halt else 0
    finally:
        bar.close()
        stop.restore()
    if not ev:                                    # resumed after the last step, for the summary only
        ev = evaluate(model, corpus, batches, proc)
    summary = {"run": meta["run_id"], **summarize(args, cfg, model, corpus, history, ev, proc, wall + time.time() - t_start)}
    run.write_summary(summary)
    proc.log(f"val loss {summary['val_loss']:.4f} (unigram {summary['unigram_loss']:.4f}) | "
             f"ppl {summary['val_ppl']:.3f} | MaxVio_global {summary['maxvio_global']:.3f} | "
             f"specialisation {summary['specialization']:.3f} | causal leak {summary['causal_leak']:.2e}")
    proc.log(against_unigram(summary["val_loss"], summary["unigram_loss"], args.steps))
    proc.log(f"results in {args.out}/: summary.json, log.jsonl, the checkpoint ckpt.pt + ckpt/ "
             f"(raise --steps and add --resume to go on)")
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
