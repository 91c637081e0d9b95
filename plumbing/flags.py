"""
plumbing/flags.py -- train.py's command line: every flag with its preset
default and its range, a strategy's knobs from its class (balancers.Knob),
--import for a user's own strategy file, and the checks that turn a bad
value into one line naming the flag. Also what makes a run the same run on
--resume (its trajectory) and on every rank.
"""

import argparse
import math
import os
from dataclasses import asdict

import balancers
import data
import moe

from . import health
from .commandline import OneLineParser, check_memory, preset_help

# Every numeric flag and the smallest value it may take; floats must also be
# finite. (A strategy's knobs carry their ranges on its class: balancers.Knob.)
AT_LEAST = dict(n_layers=1, d_model=1, n_heads=1, n_experts=1, top_k=1, d_expert=1, shared_experts=0,
                steps=1, batch_size=1, grad_accum=1, domain_block=1, seq_len=1, warmup=0, seed=0,
                eval_every=0, log_every=1, val_seqs=1, ckpt_every=1, weight_decay=0.0)


ABOVE = dict(lr=0.0, grad_clip=0.0)


# and the largest: torch.manual_seed takes an unsigned 64-bit seed
AT_MOST = dict(seed=2**64 - 1)


def parse_args(presets, argv=None):
    # A user's strategy file first: its strategies and knobs become flags.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    balancers.import_strategies(pre.parse_known_args(argv)[0].imports)
    p = OneLineParser(
        description="Train a small MoE GPT with one load-balancing strategy and report perplexity, "
                    "MaxVio, expert specialisation per domain and the causality leak.")
    p.add_argument("--balancer", default="lossfree", metavar="NAME",
                   help=" | ".join(f"{n}: {c.summary}" for n, c in balancers.BALANCERS.items()) + " (default: lossfree)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE",
                   help="a Python file (or module) of yours that calls balancers.register(...): its strategies "
                        "and their knobs become usable here (repeatable)")
    p.add_argument("--preset", default="default", choices=list(presets),
                   help="sizes and schedule; explicit flags override it (default: default)")

    def preset_flag(group, name, type, help):
        group.add_argument("--" + name.replace("_", "-"), type=type, metavar="N" if type is int else "X",
                           help=f"{help} (default: {preset_help(presets, name)})")
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
                        "(default: a new runs/BALANCER/run-NNN for every run, runs/BALANCER/latest the newest; "
                        "--resume continues the newest)")
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
    health.add_health_flags(p)
    g = p.add_argument_group("strategy knobs (each strategy reads only its own; declared on its class)")
    for name, by_strategy in balancers.all_knobs().items():
        g.add_argument(balancers.flag(name), **balancers.knob_flag(name, by_strategy))
    args = p.parse_args(argv)
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # By absolute path, so that sample.py finds the strategy from anywhere.
    args.imports = [os.path.abspath(f) if f.endswith(".py") else f for f in args.imports]
    return args


def given_knobs(args):
    """The strategy knobs given on the command line (the rest take the
    strategy's own defaults)."""
    return {name: getattr(args, name) for name in balancers.all_knobs() if getattr(args, name) is not None}


def model_config(args):
    return moe.GPTConfig(seq_len=args.seq_len, n_layers=args.n_layers, d_model=args.d_model,
                     n_heads=args.n_heads, n_experts=args.n_experts, top_k=args.top_k,
                     d_expert=args.d_expert, shared_experts=args.shared_experts,
                     balancer=args.balancer, balance=strategy_settings(args))


def strategy_settings(args):
    """The value in effect of each of the strategy's knobs: what the
    checkpoint's identity and summary.json record, so that typing a default
    changes nothing."""
    if args.balancer in balancers.BALANCERS:
        return balancers.settings(balancers.BALANCERS[args.balancer], given_knobs(args))
    return given_knobs(args)   # an unknown strategy: check_args says so in one line


# The flags that decide what is trained, beyond the model (whose settings
# the checkpoint's config holds): a resume with any of them changed would
# continue a run that matches neither set of flags. The others only decide
# what is written and when (--log-every, --stop-at, --steps raised, --out).
TRAINING_FLAGS = ("batch_size", "seed", "lr", "warmup", "grad_accum", "domain_block", "weight_decay", "grad_clip")


def trajectory(args, corpus):
    """The trajectory flags, the data folder and the corpus's fingerprint."""
    return {**{balancers.flag(k): getattr(args, k) for k in TRAINING_FLAGS},
            "--data": os.path.abspath(args.data) if args.data else None, "corpus": data.fingerprint(corpus)}


def same_everywhere(args, corpus):
    """What every process of one run must share: every flag (the data
    folder by its contents, since machines may mount it at different paths)."""
    return {**{balancers.flag(k): v for k, v in vars(args).items() if k != "data"},
            "the data (corpus fingerprint)": data.fingerprint(corpus)}


def check_resumable(ckpt, cfg, traj, path):
    """--resume continues a run only under the flags that made it: the first
    difference is named with its old and new value."""
    if "run_id" not in ckpt or "trajectory" not in ckpt:
        raise ValueError(f"--resume: {path} was written by an older train.py (no run id or trajectory flags); "
                         f"start over with --overwrite or use another --out")
    flat = lambda c: {**{balancers.flag(k): v for k, v in c.items() if k != "balance"},
                      **{balancers.flag(k): v for k, v in c.get("balance", {}).items()}}
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
    """Every balancers.flag in one place: a message that names the flag and the fix."""
    for name, low in AT_LEAST.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < low:
            raise ValueError(f"{balancers.flag(name)} must be a number >= {low} (got {value})")
    for name, low in ABOVE.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value <= low:
            raise ValueError(f"{balancers.flag(name)} must be a finite number > {low} (got {value})")
    for name, high in AT_MOST.items():
        if getattr(args, name) > high:
            raise ValueError(f"{balancers.flag(name)} must be at most {high} (got {getattr(args, name)})")
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
    moe.check_config(cfg, ep_size, local_seqs=args.batch_size // split)
    check_memory(cfg, args.batch_size // split, ep_size, device)   # experts are split ep_size ways
    health.check_health_flags(args)


def expert_parallel_size(args, world_size):
    """--ep-size, checked against the world size (the default: all processes)."""
    if args.ep_size is None:
        return world_size
    if args.ep_size < 1 or world_size % args.ep_size:
        raise ValueError(f"--ep-size {args.ep_size} must divide the {world_size} processes "
                         f"(each expert-parallel group is --ep-size of them)")
    return args.ep_size
