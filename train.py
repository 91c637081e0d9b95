"""
train.py -- train the MoE GPT with one balancing strategy and measure what
the papers measure.

    python train.py --balancer lossfree                       # one process
    torchrun --nproc_per_node=2 train.py --balancer lossfree  # expert parallel
    torchrun --nproc_per_node=4 train.py --ep-size 2          # 2 replicas x 2 expert-parallel ranks

Read it top to bottom:
  1. presets: the sizes a run starts from
  2. build: the model and its optimizer
  3. train_step: micro-steps, gradient sync, clipping, AdamW, then the
     strategy's once-per-step hook
  4. evaluate: perplexity per domain, MaxVio, expert specialisation per
     domain, and the causality probe
  5. the loop
and, after the lesson, the flags and their checks.

The global batch (--batch-size sequences) is the unit of everything: the data,
the balancing statistics and the optimizer step are defined on it, and the
number of processes and --grad-accum only decide how it is cut up. So the
same seed gives the same loss curve on 1 or 2 processes. Checkpoints, the log,
resume, signals and process exit are in plumbing: needed, but not the lesson.
"""

import math

import torch
import torch.nn.functional as F

import plumbing
from balancers import BALANCERS, count_per_expert
from data import VOCAB_SIZE, get_batch, load_corpus, val_batches
from moe import GPT, causal_logits, clip_grad_norm, sync_gradients

# ----------------------------------------------------------------------------
# 1. Presets.

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


# ----------------------------------------------------------------------------
# 2. Build: the model and its optimizer.

def build(args, proc):
    """The model (this rank's experts, everything else replicated) and AdamW.
    Seeded first, so every rank and every mesh starts from the same weights.
    lab/bench.py and the tests build through here too."""
    torch.manual_seed(args.seed)
    model = GPT(plumbing.model_config(args), proc.mesh).to(proc.device)
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
    loads, entropy = model.end_step(entropy=True)              # [layers, E], global batch; [layers]
    losses = proc.all_reduce(torch.stack([lm_sum, bal_sum])) / proc.world_size
    return {"loss": losses[0].item(), "balance_loss": losses[1].item(),
            "grad_norm": grad_norm, "lr": lr_at(step, args),
            "maxvio_batch": max_violation(loads).mean().item(),
            "maxvio_batch_by_layer": max_violation(loads).tolist(), "load": loads, "router_entropy": entropy,
            "dropped": model.last_dropped}


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
    a, b = forward_twice(model, x, x2)
    return (a[:, :t + 1] - b[:, :t + 1]).abs().max().item()


def forward_twice(model, x, x2):
    """Logits of x and of x2 with any random regrouping (--route-shuffle) drawn
    alike: the second forward replays the first's draws, so only the input
    differs, and identical inputs give identical logits (tested)."""
    saved = [(b, dict(b.draws)) for b in (layer.balancer for layer in model.moe_layers()) if hasattr(b, "draws")]
    a = model(x).logits.float()
    for balancer, draws in saved:
        balancer.draws = draws
    return a, model(x2).logits.float()


def computation_batch_maxvio(seq_load, seed=None):
    """MaxVio over computation batches of S sequences (Wang et al. 2024,
    Sec. 5.1 and Fig. 5), for S = 1, 2, 4, ... and the whole set.

    seq_load[l, n, e]: assignments to expert e of layer l by validation
    sequence n. A computation batch is what one expert-parallel step sees
    at once, micro-batch x data-parallel ranks: here S sequences taken in a
    random order fixed by `seed` (evaluate: 0), so a batch draws its sequences
    at random as training batches do, not in the validation set's round-robin
    over domains. For each S: MaxVio of every batch of S (the remainder
    that does not fill one is left out), averaged over batches and layers.
    At S = the whole set this is MaxVio_global. Returns {"sizes", "maxvio"}."""
    L, N, E = seq_load.shape
    seq_load = seq_load if seed is None else seq_load[:, torch.randperm(N, generator=torch.Generator().manual_seed(seed))]
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
            load[l] += count_per_expert(routing.expert_idx, cfg.n_experts)
            cell = tok_domain[routing.token_idx] * cfg.n_experts + routing.expert_idx
            picks[l] += count_per_expert(cell, D * cfg.n_experts).view(D, cfg.n_experts)
            seq = first + r * b + routing.token_idx // y.shape[1]      # this rank's rows of the batch
            seq_load[l] += count_per_expert(seq * cfg.n_experts + routing.expert_idx, seq_load.shape[1])
        first += rows
    for t in (loss_sum, tok_sum, load, picks, seq_load):
        proc.all_reduce(t)
    freq = picks.double() / tok_sum.clamp(min=1)[None, :, None]
    x0 = batches[0][0]
    b = x0.shape[0] // W
    # Under the autocast that trains: the leak of the path the model runs on.
    with autocast(proc.device):
        leak = torch.tensor(causal_probe(model, x0[r * b:(r + 1) * b].to(proc.device), x0.shape[1] // 2,
                                         torch.Generator().manual_seed(1234)), device=proc.device)
    proc.all_reduce(leak, "max")
    by_domain = (loss_sum / tok_sum.clamp(min=1)).tolist()
    val_loss = (loss_sum.sum() / tok_sum.sum()).item()
    mv = max_violation(load)
    # Token choice is exactly causal, unless --expert-capacity lets the batch decide what is dropped
    leaks = not BALANCERS[cfg.balancer].token_choice or (cfg.balance or {}).get("expert_capacity")
    causal = causal_evaluation(model, batches[:causal_batches], proc) if leaks and causal_batches else {}
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), **causal,
            "val_loss_by_domain": dict(zip(corpus.domains, by_domain)),
            "val_ppl_by_domain": {d: math.exp(v) for d, v in zip(corpus.domains, by_domain)},
            "val_tokens": int(tok_sum.sum().item()),
            "maxvio_global": mv.mean().item(), "maxvio_global_by_layer": mv.tolist(),
            "maxvio_computation_batch": computation_batch_maxvio(seq_load.view(cfg.n_layers, n_seqs, -1), seed=0),
            "specialization": specialization_score(freq),
            "expert_freq": freq.tolist(), "causal_leak": leak.item()}


def unigram_loss(corpus):
    """Cross-entropy of the best context-free guess: the training byte
    frequencies, scored on the validation text. The model must beat it."""
    train = torch.cat(corpus.train).long()
    p = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1
    p = p / p.sum()
    val = torch.cat(corpus.val).long()
    return -p.log()[val].mean().item()


# ----------------------------------------------------------------------------
# 5. The loop.

def main(argv=None):
    args = parse_args(argv)
    proc = plumbing.Proc.from_env(args.device)
    plumbing.check_args(args, proc.world_size, proc.device)  # before the process group: bad flags stop every rank at once
    proc.start(args.ep_size)
    # The data before the output folder: a mistake in it costs nothing there.
    corpus = load_corpus(args.data, seq_len=args.seq_len, log=proc.log)
    proc.check_same_everywhere(plumbing.same_everywhere(args, corpus))
    # Without --out, a new runs/BALANCER/run-NNN: a rerun never meets the last run.
    fresh_folder = args.out is None
    args.out = args.out or plumbing.default_run_folder(args.balancer, args.resume, proc)
    run = plumbing.open_run_dir(args.out, proc, args.resume, args.overwrite)
    if fresh_folder:
        plumbing.point_latest(args.out, proc)
    try:
        return train(args, proc, run, corpus)
    finally:
        run.close()


def train(args, proc, run, corpus):
    """Train, evaluate now and then, finish with the summary. Everything a run
    must also do (resume, the log, checkpoints, Ctrl-C, the progress bar) is
    the session's, after the lesson."""
    model, opt = build(args, proc)
    batches = val_batches(corpus, args.seq_len, args.batch_size // args.grad_accum, args.val_seqs)
    with plumbing.Session(args, proc, run, corpus, model, opt, unigram_loss(corpus)) as session:
        if session.finished:
            return 0
        ev = {}
        for step in range(session.step, args.steps):
            with session.timed(step):
                rec = train_step(model, opt, corpus, step, args, proc)
            if step + 1 == args.steps or (args.eval_every and (step + 1) % args.eval_every == 0):
                ev = evaluate(model, corpus, batches, proc)
                rec.update(ev)
            if session.record(step + 1, rec):      # log line, bar, checkpoint; True: asked to stop
                return session.stopped()
        return session.finish(ev or evaluate(model, corpus, batches, proc))


# ----------------------------------------------------------------------------
# The command line (its flags and checks are in plumbing/flags.py).

def parse_args(argv=None):
    return plumbing.parse_args(PRESETS, argv)

if __name__ == "__main__":
    plumbing.cli(main)
