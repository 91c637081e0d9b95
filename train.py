"""
train.py -- train the MoE GPT with one balancing strategy and measure what
the papers measure.

    python train.py --balancer lossfree                       # one process
    torchrun --nproc_per_node=2 train.py --balancer lossfree  # expert parallel

Read it top to bottom:
  1. the command line and its presets
  2. distributed set-up (gloo on CPU, nccl on CUDA; plain python = 1 rank)
  3. train_step: micro-steps, gradient sync, clipping, AdamW, the strategy's
     once-per-step hook
  4. evaluate: perplexity per domain, MaxVio_global, expert specialisation per
     domain, and the causality probe
  5. checkpoints (atomic, world-size independent) and the main loop

The global batch (--batch-size sequences) is the unit of everything: the data,
the balancing statistics and the optimizer step are defined on it, and the
number of processes and --grad-accum only decide how it is cut up. So the
same seed gives the same loss curve on 1 or 2 processes.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from balancers import BALANCERS, BalanceConfig
from data import get_batch, load_corpus, val_batches
from moe import GPT, GPTConfig, check_config, clip_grad_norm, is_expert_param, max_violation, sync_gradients

# ----------------------------------------------------------------------------
# 1. Command line.

# tiny: seconds, for tests and smoke runs. default: shows the papers' effects
# in a few minutes on a 2-core CPU. Any explicit flag overrides the preset.
PRESETS = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_experts=8, top_k=2, d_expert=64,
                 seq_len=64, batch_size=8, steps=20, lr=3e-3, warmup=5, eval_every=0,
                 log_every=1, val_seqs=8),
    # The lossfree bias moves by u = 1e-3 per optimizer step, so balance is a
    # matter of steps, not tokens: the default takes many small steps.
    "default": dict(n_layers=4, d_model=128, n_heads=4, n_experts=16, top_k=2, d_expert=128,
                    seq_len=128, batch_size=16, steps=1000, lr=2e-3, warmup=50, eval_every=250,
                    log_every=10, val_seqs=32),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (not the whole usage) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(
        description="Train a small MoE GPT with one load-balancing strategy and report perplexity, "
                    "MaxVio, expert specialisation per domain and the causality leak.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--balancer", default="lossfree", choices=list(BALANCERS),
                   help="none: plain top-k | aux: Switch aux loss over balance groups | global_aux: "
                        "aux loss with global-batch counts (Qiu et al.) | lossfree: expert bias (Wang et al.) | "
                        "seq_aux: lossfree + per-sequence aux (DeepSeek-V3) | expert_choice: experts pick tokens (Zhou et al.)")
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="sizes and schedule; explicit flags override it")
    g = p.add_argument_group("model (default: from the preset)")
    g.add_argument("--n-layers", type=int)
    g.add_argument("--d-model", type=int)
    g.add_argument("--n-heads", type=int)
    g.add_argument("--n-experts", type=int)
    g.add_argument("--top-k", type=int, help="experts per token (token-choice strategies)")
    g.add_argument("--d-expert", type=int, help="hidden width of each expert")
    g.add_argument("--shared-experts", type=int, default=0, help="always-on experts (DeepSeekMoE)")
    g = p.add_argument_group("training (default: from the preset)")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch in sequences; processes and --grad-accum split it")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate (warm-up, then cosine to 10%%)")
    g.add_argument("--warmup", type=int, help="warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data", metavar="DIR", help="your own text: one domain per subfolder (or per file)")
    g.add_argument("--out", metavar="DIR", help="log.jsonl, summary.json and ckpt.pt go here (default: runs/BALANCER)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if OUT/ckpt.pt exists")
    g.add_argument("--stop-at", type=int, default=-1, metavar="N",
                   help="stop after step N with a checkpoint, as if interrupted (continue with --resume)")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int, help="write log.jsonl every N steps")
    g.add_argument("--val-seqs", type=int, help="validation sequences per domain")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    # Failure injection for the tests of distributed error handling; hidden from --help.
    g.add_argument("--crash-step", type=int, default=-1, help=argparse.SUPPRESS)
    g.add_argument("--crash-rank", type=int, default=-1, help=argparse.SUPPRESS)
    g = p.add_argument_group("strategy knobs (default: the paper's value)")
    g.add_argument("--gate", choices=["softmax", "sigmoid"], help="override the strategy's gate")
    g.add_argument("--alpha", type=float, help="aux-loss coefficient (aux/global_aux 1e-2, seq_aux 1e-4)")
    g.add_argument("--balance-seqs", type=int, default=2, help="aux: sequences per balance group")
    g.add_argument("--bias-rate", type=float, default=1e-3, help="lossfree: bias update rate u")
    g.add_argument("--capacity-factor", type=float, default=2.0, help="expert_choice: capacity factor c")
    g.add_argument("--route-seqs", type=int, default=2, help="expert_choice: sequences per routing group")
    g.add_argument("--route-shuffle", action="store_true",
                   help="expert_choice: shuffle tokens across sequences before grouping (the leak's control)")
    g.add_argument("--z-loss", type=float, default=0.0, help="router z-loss coefficient (any strategy; ST-MoE: 1e-3)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join("runs", args.balancer)
    return args


def check_args(args, world_size):
    """Reject bad numbers with a message that names the flag and the fix."""
    for flag in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "val_seqs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.lr <= 0 or args.warmup < 0 or args.eval_every < 0:
        raise ValueError("--lr must be > 0, --warmup and --eval-every >= 0")
    split = world_size * args.grad_accum
    if args.batch_size % split:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by processes x --grad-accum = {split}: "
                         f"use a multiple of {split}")
    local = args.batch_size // split
    knob = {"aux": "balance_seqs", "expert_choice": "route_seqs"}.get(args.balancer)
    if knob and local % getattr(args, knob):
        raise ValueError(f"--{knob.replace('_', '-')} {getattr(args, knob)} must divide the {local} sequences "
                         f"each process sees per micro-step")


def model_config(args):
    balance = BalanceConfig(gate=args.gate, alpha=args.alpha, balance_seqs=args.balance_seqs,
                            bias_rate=args.bias_rate, capacity_factor=args.capacity_factor,
                            route_seqs=args.route_seqs, route_shuffle=args.route_shuffle,
                            z_loss=args.z_loss)
    return GPTConfig(seq_len=args.seq_len, n_layers=args.n_layers, d_model=args.d_model,
                     n_heads=args.n_heads, n_experts=args.n_experts, top_k=args.top_k,
                     d_expert=args.d_expert, shared_experts=args.shared_experts,
                     balancer=args.balancer, balance=balance)


# ----------------------------------------------------------------------------
# 2. Distributed set-up.

def setup_distributed(device_arg="auto"):
    """torchrun sets WORLD_SIZE/RANK; plain `python` runs as the only rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # A bounded timeout: if one rank dies, the others fail instead of waiting forever.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    return rank, world_size, device


def all_reduce_(t, world_size, op=None):
    """Sum (or op) a tensor over ranks in place; a no-op for one process."""
    if world_size > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------
# 3. One optimizer step.

def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def autocast(device):
    """bf16 autocast on CUDA (the router keeps fp32 itself); plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model, opt, corpus, step, args, rank, world_size, device):
    """One optimizer step over the global batch of `step`.

    Each micro-step's loss is divided by grad_accum so the gradients add up to
    those of the mean over the rank's share; sync_gradients then averages over
    ranks. The strategy's step() runs exactly once, after the optimizer: the
    lossfree bias learns from the batch just trained on, never the next one."""
    model.train()
    lm_sum = torch.zeros((), device=device)
    bal_sum = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        x, y, _ = get_batch(corpus, step, args.seed, args.batch_size, args.seq_len,
                            rank, world_size, micro, args.grad_accum)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            out = model(x, y)
        ((out.lm_loss + out.balance_loss) / args.grad_accum).backward()
        lm_sum += out.lm_loss.detach() / args.grad_accum
        bal_sum += out.balance_loss.detach() / args.grad_accum
    sync_gradients(model)
    grad_norm = clip_grad_norm(model, args.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loads = model.end_step()                                   # [layers, E], global batch
    losses = all_reduce_(torch.stack([lm_sum, bal_sum]), world_size) / world_size
    return {"loss": losses[0].item(), "balance_loss": losses[1].item(),
            "grad_norm": grad_norm.item(), "lr": lr_at(step, args),
            "maxvio_batch": max_violation(loads).mean().item(),
            "maxvio_batch_by_layer": max_violation(loads).tolist()}


# ----------------------------------------------------------------------------
# 4. Evaluation: the papers' measurements.

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
    group, later ones included, so it does not (Wang et al. 2024, App. C).
    Returns the max |change| of the logits at positions <= t."""
    model.eval()
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, model.cfg.vocab_size, x2[:, t + 1:].shape, generator=generator).to(x.device)
    a = model(x).logits[:, :t + 1].float()
    b = model(x2).logits[:, :t + 1].float()
    return (a - b).abs().max().item()


@torch.no_grad()
def evaluate(model, corpus, batches, rank, world_size, device):
    """Loss/perplexity per domain, MaxVio_global, specialisation and the leak,
    over the fixed validation set. Each rank takes its slice of every batch;
    sums are all-reduced, so the figures do not depend on the world size."""
    model.eval()
    cfg, D = model.cfg, len(corpus.domains)
    loss_sum = torch.zeros(D, device=device, dtype=torch.float64)
    tok_sum = torch.zeros(D, device=device, dtype=torch.float64)
    load = torch.zeros(cfg.n_layers, cfg.n_experts, device=device, dtype=torch.long)
    picks = torch.zeros(cfg.n_layers, D, cfg.n_experts, device=device, dtype=torch.long)
    for x, y, dom in batches:
        b = x.shape[0] // world_size
        x, y, dom = (t[rank * b:(rank + 1) * b].to(device) for t in (x, y, dom))
        with autocast(device):
            out = model(x)
        nll = torch.nn.functional.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none")
        loss_sum.index_add_(0, dom, nll.sum(1).double())
        tok_sum.index_add_(0, dom, torch.full_like(dom, y.shape[1], dtype=torch.float64))
        tok_domain = dom.repeat_interleave(y.shape[1])                       # domain of every token
        for l, r in enumerate(out.routings):
            load[l] += torch.bincount(r.expert_idx, minlength=cfg.n_experts)
            cell = tok_domain[r.token_idx] * cfg.n_experts + r.expert_idx
            picks[l] += torch.bincount(cell, minlength=D * cfg.n_experts).view(D, cfg.n_experts)
    for t in (loss_sum, tok_sum, load, picks):
        all_reduce_(t, world_size)
    freq = picks.double() / tok_sum.clamp(min=1)[None, :, None]
    x0 = batches[0][0]
    b = x0.shape[0] // world_size
    leak = torch.tensor(causal_probe(model, x0[rank * b:(rank + 1) * b].to(device), x0.shape[1] // 2,
                                     torch.Generator().manual_seed(1234)), device=device)
    all_reduce_(leak, world_size, dist.ReduceOp.MAX if world_size > 1 else None)
    by_domain = (loss_sum / tok_sum.clamp(min=1)).tolist()
    val_loss = (loss_sum.sum() / tok_sum.sum()).item()
    mv = max_violation(load)
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "val_loss_by_domain": dict(zip(corpus.domains, by_domain)),
            "val_ppl_by_domain": {d: math.exp(v) for d, v in zip(corpus.domains, by_domain)},
            "maxvio_global": mv.mean().item(), "maxvio_global_by_layer": mv.tolist(),
            "specialization": specialization_score(freq),
            "expert_freq": freq.tolist(), "causal_leak": leak.item()}


def unigram_loss(corpus):
    """Cross-entropy of the best context-free guess: the training byte
    frequencies, scored on the validation text. The model must beat it."""
    train = torch.cat(corpus.train).long()
    p = torch.bincount(train, minlength=256).double() + 1
    p = p / p.sum()
    val = torch.cat(corpus.val).long()
    return -p.log()[val].mean().item()


# ----------------------------------------------------------------------------
# 5. Checkpoints and the main loop.

def gather_experts(tensor, world_size):
    """Concatenate every rank's expert shard along dim 0 (checkpoints hold all
    experts, so a run can resume on a different number of processes)."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def shard_experts(tensor, rank, world_size):
    n = tensor.shape[0] // world_size
    return tensor[rank * n:(rank + 1) * n]


def full_state(model, opt, world_size):
    """Model and optimizer state with expert tensors gathered from all ranks.
    (Collective: every rank must call it.)"""
    model_state = {k: gather_experts(v, world_size) if is_expert_param(k) else v
                   for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    # The optimizer numbers parameters in group order; remember their names.
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for group in opt.param_groups for p in group["params"]]
    for i, name in enumerate(order):
        if is_expert_param(name) and i in opt_state["state"]:
            s = opt_state["state"][i]
            opt_state["state"][i] = {k: gather_experts(v, world_size) if v.dim() else v for k, v in s.items()}
    return model_state, opt_state, order


def save_checkpoint(path, model, opt, step, args, rank, world_size):
    """Write atomically: a temporary file, then os.replace. A kill during the
    write leaves the previous checkpoint intact."""
    model_state, opt_state, order = full_state(model, opt, world_size)
    if rank != 0:
        return
    ckpt = {"model": model_state, "optimizer": opt_state, "param_order": order, "step": step,
            "config": asdict(model_config(args)), "args": vars(args),
            "rng": torch.get_rng_state()}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, model, opt, args, rank, world_size):
    """Restore model, optimizer and strategy state; return the step to resume at."""
    if not os.path.exists(path):
        raise ValueError(f"--resume: no checkpoint at {path}; run without --resume first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); "
                         f"delete it or point --out elsewhere") from None
    if ckpt.get("config") != asdict(model_config(args)):
        raise ValueError(f"--resume: {path} was made with a different model or strategy; "
                         f"use the same flags or another --out")
    model.load_state_dict({k: shard_experts(v, rank, world_size) if is_expert_param(k) else v
                           for k, v in ckpt["model"].items()}, strict=False)
    opt_state = ckpt["optimizer"]
    for i, name in enumerate(ckpt["param_order"]):
        if is_expert_param(name) and i in opt_state["state"]:
            opt_state["state"][i] = {k: shard_experts(v, rank, world_size) if v.dim() else v
                                     for k, v in opt_state["state"][i].items()}
    opt.load_state_dict(opt_state)
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


def prepare_out_dir(args, rank):
    """Create --out and make sure we may write there and will not clobber a run."""
    ckpt = os.path.join(args.out, "ckpt.pt")
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write-test-{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {args.out} cannot be written ({e.strerror}): choose another folder") from None
    if os.path.exists(ckpt) and not (args.resume or args.overwrite):
        raise ValueError(f"{ckpt} already exists: add --resume to continue that run, --overwrite to "
                         f"start over, or choose another --out")
    return ckpt


def read_log(path, upto_step):
    """The records of a resumed run, cut at the checkpoint's step (steps after
    it were lost with the interruption and will be redone)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:   # a line torn by a hard kill
                continue
    return [r for r in records if r["step"] <= upto_step]


def summarize(args, cfg, corpus, model, history, ev, world_size, wall_time):
    """summary.json: the run's final figures in one flat record."""
    tail = history[-max(1, len(history) // 10):]
    mean = lambda key, rows: sum(r[key] for r in rows) / max(1, len(rows))
    return {"balancer": args.balancer, "steps": args.steps, "world_size": world_size, "seed": args.seed,
            "config": asdict(cfg), "args": vars(args), "domains": corpus.domains,
            "unigram_loss": unigram_loss(corpus), **ev,
            "maxvio_batch": mean("maxvio_batch", history),            # averaged over training
            "maxvio_batch_final": mean("maxvio_batch", tail),         # the last 10% of logged steps
            "tokens_per_second": mean("tokens_per_s", history), "wall_time_s": wall_time,
            "bias": [layer.balancer.bias.tolist() for layer in model.moe_layers()
                     if hasattr(layer.balancer, "bias")]}


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    check_args(args, world_size)
    cfg = model_config(args)
    check_config(cfg, world_size)
    corpus = load_corpus(args.data, seq_len=args.seq_len, log=log)
    ckpt_path = prepare_out_dir(args, rank)
    log_path = os.path.join(args.out, "log.jsonl")

    torch.manual_seed(args.seed)
    model = GPT(cfg, rank, world_size).to(device)
    opt = make_optimizer(model, args)
    step = load_checkpoint(ckpt_path, model, opt, args, rank, world_size) if args.resume else 0
    history = read_log(log_path, step) if args.resume else []
    batches = val_batches(corpus, args.seq_len, args.batch_size // args.grad_accum, args.val_seqs)
    n_active = sum(p.numel() for n, p in model.named_parameters() if not is_expert_param(n)) + \
        cfg.n_layers * cfg.top_k * 3 * cfg.d_model * cfg.d_expert
    log(f"{args.balancer} | {world_size} process(es) on {device} | {cfg.n_layers} layers, "
        f"{cfg.n_experts} experts top-{cfg.top_k}, ~{n_active / 1e6:.2f}M active params | "
        f"unigram baseline val loss {unigram_loss(corpus):.3f}" + (f" | resuming at step {step}" if step else ""))

    # SIGTERM (a scheduler, torchrun being stopped) or Ctrl-C finishes the
    # current step, saves a checkpoint and exits, on every rank at the same step.
    stop = {"signal": False}

    def on_signal(signum, frame):
        if stop["signal"] and signum == signal.SIGINT:
            raise KeyboardInterrupt            # a second Ctrl-C: leave now
        stop["signal"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logf = None
    if rank == 0:
        logf = open(log_path, "w")
        logf.writelines(json.dumps(r) + "\n" for r in history)   # rewrite, cut at the checkpoint
        logf.flush()
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, desc=args.balancer, dynamic_ncols=True, disable=rank != 0)
    tokens_per_step = args.batch_size * args.seq_len
    ev, t_start = {}, time.time()
    while step < args.steps:
        if args.crash_step == step and args.crash_rank == rank:
            raise RuntimeError(f"forced failure on rank {rank} at step {step} (--crash-step)")
        t0 = time.time()
        rec = train_step(model, opt, corpus, step, args, rank, world_size, device)
        rec["tokens_per_s"] = tokens_per_step / (time.time() - t0)
        step += 1
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss became {rec['loss']} at step {step}; stopped without saving, "
                                     f"{ckpt_path} keeps the last good state. Try a lower --lr")
        biases = [layer.balancer.bias for layer in model.moe_layers() if hasattr(layer.balancer, "bias")]
        if biases:
            rec["bias"] = torch.stack(biases).tolist()     # lossfree: the bias trajectories
        final = step == args.steps
        if final or (args.eval_every and step % args.eval_every == 0):
            ev = evaluate(model, corpus, batches, rank, world_size, device)
            rec.update({k: v for k, v in ev.items() if k != "expert_freq"})
        if final or step % args.log_every == 0 or "val_loss" in rec:
            rec = {"step": step, **rec}
            history.append(rec)
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", maxvio=f"{rec['maxvio_batch']:.2f}")
        halt = all_reduce_(torch.tensor(float(stop["signal"]), device=device), world_size).item()
        if final or "val_loss" in rec or halt or step == args.stop_at:
            save_checkpoint(ckpt_path, model, opt, step, args, rank, world_size)
        if halt or step == args.stop_at:
            bar.close()
            log(f"stopped at step {step}, checkpoint saved; continue with the same flags plus --resume")
            return 1 if halt else 0
    bar.close()
    if rank == 0:
        summary = summarize(args, cfg, corpus, model, history, ev, world_size, time.time() - t_start)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log(f"val loss {summary.get('val_loss', float('nan')):.4f} (unigram {summary['unigram_loss']:.4f}) | "
            f"ppl {summary.get('val_ppl', float('nan')):.3f} | MaxVio_global {summary.get('maxvio_global', 0):.3f} | "
            f"specialisation {summary.get('specialization', 0):.3f} | causal leak {summary.get('causal_leak', 0):.2e}")
    return 0


def cli(entry=None):
    """Entry point: user mistakes become one line on stderr and exit code 2.
    compare.py reuses it with its own `entry`."""
    try:
        code = (entry or main)()
        if dist.is_initialized():
            dist.barrier()          # tear down together, once every rank is done
    except (ValueError, FloatingPointError) as e:
        # Every rank sees the same flags and fails the same way: one line is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, ValueError) else 1
    finally:
        distributed = dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed:
        leave(code)
    sys.exit(code)


def leave(code):
    """End a process that used torch.distributed, skipping the interpreter's
    teardown. Now and then (a few runs in a hundred here) a gloo process
    aborts in a C++ destructor after all Python code has run ("terminate
    called without an active exception"), which would turn a finished run
    into a failure. Everything this project writes is closed or flushed by
    then, so there is nothing left for the teardown to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
