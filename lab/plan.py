"""
lab/plan.py -- what one training step moves and stores on a GPU cluster, on
paper: bytes counted from the model's shapes, times from stated link speeds.

    python -m lab.plan --nodes 8 --gpus-per-node 8 --ep-size 8 --preset gpu
    python -m lab.plan --nodes 64 --gpus-per-node 8 --ep-size 8 --preset gpu --batch-size 4096

Any train.py flag that shapes the model or the batch (--batch-size,
--n-experts, --grad-accum, ...) may follow; --ep-size defaults to all GPUs,
as in train.py. Nothing is run: the model is built on PyTorch's "meta"
device (shapes without memory), so the parameter counts are the real
model's and a 64-node plan takes a second.

Per step and per GPU it prints:
  all-to-all   the rows each MoE layer sends out of a rank: dispatch and
               return, forward and backward, in bf16 (moe.wire_dtype), a
               share (ep-1)/ep of them to other ranks when routing is even
  all-reduce   the fp32 gradients, ring all-reduce (each rank sends
               2 (n-1)/n of the buffer): replicated ones over all GPUs,
               expert ones over the dp replicas of the same experts
  checkpoint   plumbing.save_checkpoint's step folder
               (torch.distributed.checkpoint): weights and AdamW moments,
               each expert shard written once by a rank that holds it, the
               replicated tensors once; on resume every rank reads its own
               experts and the replicated tensors. Both times the folder is
               read once more, shared out among the ranks, for its sha256s
  memory       fp32 weights, gradients and the two AdamW moments of one
               GPU's share (activations not included)
and the seconds those bytes take. The links are stated, not measured:
NVLink 900 GB/s (H100, both directions together: 450 GB/s each way) inside
a node and one 400 Gb/s InfiniBand port per GPU (50 GB/s each way) between
nodes; a collective whose group spans nodes is timed at the InfiniBand rate.
An exchange sends and receives at once, so its time is the bytes sent one
way over the one-way rate. docs/scaling.md prints and reads three plans.
"""

from dataclasses import dataclass

import torch

import plumbing
import train
from lab.bench import flops_per_token
from moe import GPT, Mesh, MeshLayout, check_config, is_expert_param

WIRE_BYTES = 2      # bf16 rows under CUDA autocast
GRAD_BYTES = 4      # fp32 master weights, so fp32 gradients
PARAM_BYTES = 4
ADAM_BYTES = 8      # two fp32 moments per parameter


@dataclass
class Links:
    """One-way bytes per second of each link, from the stated speeds."""
    nvlink_GBps: float = 900.0      # both directions together
    ib_Gbps: float = 400.0          # one port per GPU, each way
    fs_GBps: float = 2.0            # the shared filesystem's checkpoint rate, all readers together
    tflops: float = 989.0           # H100 SXM dense bf16 peak
    mfu: float = 0.4                # the share of it a step achieves (an assumption)

    @property
    def nvlink(self):
        return self.nvlink_GBps / 2 * 1e9

    @property
    def ib(self):
        return self.ib_Gbps / 8 * 1e9


def ring_bytes(size, n):
    """Bytes one rank sends in a ring all-reduce of `size` bytes over n ranks:
    the reduce-scatter and the all-gather each pass (n-1)/n of the buffer."""
    return 2 * (n - 1) * size / n


def nodes_of(ranks, gpus_per_node):
    return {r // gpus_per_node for r in ranks}


def plan(cfg, batch_size, grad_accum, nodes, gpus_per_node, ep_size):
    """The figures of one optimizer step for one GPU, as a flat dict of byte
    counts (and the model's sizes). Pure arithmetic on the model's shapes."""
    W = nodes * gpus_per_node
    layout = MeshLayout(W, ep_size)
    with torch.device("meta"):                  # shapes only: no memory, no random numbers drawn
        model = GPT(cfg, Mesh(0, W, ep_size))
    replicated = sum(p.numel() for n, p in model.named_parameters() if not is_expert_param(n))
    local_experts = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n))
    all_experts = local_experts * ep_size
    buffers = sum(b.numel() * b.element_size() for b in model.state_dict().values()) \
        - PARAM_BYTES * (replicated + local_experts)            # the strategy's state (lossfree's bias)

    tokens = batch_size * cfg.seq_len // (W * grad_accum)       # per rank and micro-step
    rows = tokens * cfg.top_k                                   # assignments (expert choice: capacity factor)
    # 4 exchanges per layer and micro-step: rows out and results back, in
    # the forward and again (their gradients) in the backward.
    a2a_layer = 4 * rows * cfg.d_model * WIRE_BYTES
    row = layout.ep_groups()[0]
    # The rank of row 0 with the most peers on other nodes sets the pace.
    off_node = max(sum(q // gpus_per_node != r // gpus_per_node for q in row) for r in row)
    on_node = ep_size - 1 - off_node
    a2a_layer_nvlink = a2a_layer * on_node // ep_size
    a2a_layer_ib = a2a_layer * off_node // ep_size
    micro_layers = cfg.n_layers * grad_accum
    counts = micro_layers * cfg.n_experts * 8 * (ep_size - 1) // ep_size if ep_size > 1 else 0

    dp_group = layout.dp_groups()[0]
    return dict(
        world_size=W, ep_size=ep_size, dp_size=layout.dp_size, tokens_per_micro_step=tokens,
        moe_passes=micro_layers,                                 # MoE layer forwards per step
        replicated_params=replicated, expert_params_per_gpu=local_experts, expert_params=all_experts,
        active_params=model.active_params(),
        a2a_bytes_per_layer=a2a_layer * (ep_size - 1) // ep_size,    # what leaves the rank
        a2a_bytes_per_layer_nvlink=a2a_layer_nvlink, a2a_bytes_per_layer_ib=a2a_layer_ib,
        a2a_bytes=micro_layers * a2a_layer * (ep_size - 1) // ep_size, count_bytes=counts,
        a2a_crosses_nodes=off_node > 0,
        allreduce_replicated_buffer=GRAD_BYTES * replicated,
        allreduce_replicated_bytes=round(ring_bytes(GRAD_BYTES * replicated, W)),
        allreduce_replicated_crosses_nodes=nodes > 1,
        allreduce_expert_buffer=GRAD_BYTES * local_experts,
        allreduce_expert_bytes=round(ring_bytes(GRAD_BYTES * local_experts, layout.dp_size)),
        allreduce_expert_crosses_nodes=len(nodes_of(dp_group, gpus_per_node)) > 1,
        allreduce_load_bytes=round(ring_bytes(8 * cfg.n_layers * cfg.n_experts, W)),
        param_bytes_per_gpu=PARAM_BYTES * (replicated + local_experts),
        grad_bytes_per_gpu=GRAD_BYTES * (replicated + local_experts),
        adam_bytes_per_gpu=ADAM_BYTES * (replicated + local_experts),
        ckpt_bytes=(PARAM_BYTES + ADAM_BYTES) * (replicated + all_experts) + buffers,    # the whole folder
        ckpt_shard_bytes=(PARAM_BYTES + ADAM_BYTES) * local_experts,   # one ep rank's experts
        ckpt_replicated_bytes=(PARAM_BYTES + ADAM_BYTES) * replicated + buffers,
        ckpt_resume_read_bytes=W * ((PARAM_BYTES + ADAM_BYTES) * (replicated + local_experts) + buffers),
        ckpt_hash_read_bytes=(PARAM_BYTES + ADAM_BYTES) * (replicated + all_experts) + buffers,   # save and resume
        flops_per_gpu=tokens * grad_accum * flops_per_token(model),       # bench's count, the one MFU uses
    )


def times(p, links):
    """Seconds per step for each figure of plan(), at the stated links."""
    nv, ib = links.nvlink, links.ib
    # NVLink and InfiniBand carry their shares of an exchange at the same time.
    a2a = p["moe_passes"] * max(p["a2a_bytes_per_layer_nvlink"] / nv, p["a2a_bytes_per_layer_ib"] / ib)
    rate = lambda crosses: ib if crosses else nv
    return dict(
        a2a=a2a,
        allreduce=p["allreduce_replicated_bytes"] / rate(p["allreduce_replicated_crosses_nodes"])
        + p["allreduce_expert_bytes"] / rate(p["allreduce_expert_crosses_nodes"]),
        compute=p["flops_per_gpu"] / (links.tflops * 1e12 * links.mfu),
        ckpt_write=(p["ckpt_bytes"] + p["ckpt_hash_read_bytes"]) / (links.fs_GBps * 1e9),
        ckpt_resume=(p["ckpt_resume_read_bytes"] + p["ckpt_hash_read_bytes"]) / (links.fs_GBps * 1e9),
    )


def size(n):
    """Bytes as a short human figure."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def ms(s):
    return f"{s * 1e3:.2f} ms"


def report(p, t, cfg, args, links):
    """The plan as lines of text."""
    W, ep, dp = p["world_size"], p["ep_size"], p["dp_size"]
    where = lambda crosses: "InfiniBand" if crosses else "NVLink"
    lines = [
        f"mesh: {args.nodes} node(s) x {args.gpus_per_node} GPUs = {W} ranks; ep {ep} x dp {dp} "
        f"({dp} expert-parallel group(s) of {ep} consecutive ranks, "
        f"{dp} cop{'y' if dp == 1 else 'ies'} of every expert)",
        f"model ({args.preset} preset): {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_experts} experts "
        f"top-{cfg.top_k} (d_expert {cfg.d_expert}) + {cfg.shared_experts} shared; "
        f"{p['replicated_params'] / 1e6:.1f}M replicated + {p['expert_params'] / 1e6:.1f}M expert parameters, "
        f"{p['active_params'] / 1e6:.1f}M active per token",
        f"batch: {args.batch_size} x {cfg.seq_len} tokens per step, {p['tokens_per_micro_step']} per GPU and "
        f"micro-step ({args.grad_accum} micro-step(s))",
        "per step and GPU:",
        f"  all-to-all   {size(p['a2a_bytes_per_layer'])} per layer leave the GPU "
        f"({size(p['a2a_bytes_per_layer_nvlink'])} over NVLink, {size(p['a2a_bytes_per_layer_ib'])} over InfiniBand); {size(p['a2a_bytes'])} for all "
        f"layers, plus {size(p['count_bytes'])} of counts",
        f"  all-reduce   replicated gradients {size(p['allreduce_replicated_buffer'])} over {W} GPUs: sends "
        f"{size(p['allreduce_replicated_bytes'])} ({where(p['allreduce_replicated_crosses_nodes'])}); "
        + (f"expert gradients {size(p['allreduce_expert_buffer'])} over {dp} replicas: sends "
           f"{size(p['allreduce_expert_bytes'])} ({where(p['allreduce_expert_crosses_nodes'])})" if dp > 1 else
           f"expert gradients {size(p['allreduce_expert_buffer'])}: no replica to average with")
        + f"; loads {size(p['allreduce_load_bytes'])}",
        f"  checkpoint   a folder of {size(p['ckpt_bytes'])}: {ep} expert shards of {size(p['ckpt_shard_bytes'])}, "
        f"each written by one of its {dp} holder(s), and {size(p['ckpt_replicated_bytes'])} of replicated "
        f"state written once; on resume each GPU reads its own experts and the replicated state, "
        f"{size(p['ckpt_resume_read_bytes'])} in all; the sha256s read the folder once more on each",
        f"  memory       weights {size(p['param_bytes_per_gpu'])}, gradients {size(p['grad_bytes_per_gpu'])}, "
        f"AdamW moments {size(p['adam_bytes_per_gpu'])} (saving gathers no copy: "
        f"python -m lab.bench --checkpoint-memory)",
        f"time per step at NVLink {links.nvlink_GBps:g} GB/s, InfiniBand {links.ib_Gbps:g} Gb/s per GPU, "
        f"{links.tflops:g} TFLOP/s at {links.mfu:.0%} MFU:",
        f"  compute {ms(t['compute'])} | all-to-all {ms(t['a2a'])} | all-reduce {ms(t['allreduce'])} | "
        f"checkpoint: write {ms(t['ckpt_write'])} and resume "
        f"{t['ckpt_resume']:.1f} s at {links.fs_GBps:g} GB/s",
    ]
    step = {"compute": t["compute"], "all-to-all": t["a2a"], "all-reduce": t["allreduce"]}
    first = max(step, key=step.get)
    lines.append(f"largest share of a step: {first} ({ms(step[first])} of {ms(sum(step.values()))} "
                 f"if nothing overlaps)")
    return lines


def parse_args(argv=None):
    p = plumbing.OneLineParser(description="Bytes and seconds of one training step on a GPU cluster, on paper. "
                                           "train.py's flags may follow: --ep-size N (default: all GPUs), "
                                           "--preset, --batch-size, --grad-accum, --n-experts, ...")
    p.prog = "python -m lab.plan"   # what --help and errors call it: it runs as a module
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="machines (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="N", help="GPUs per machine (default: 8)")
    p.add_argument("--nvlink-GBps", type=float, default=Links.nvlink_GBps, metavar="X",
                   help="NVLink bandwidth, both directions together (default: %(default)s, H100)")
    p.add_argument("--ib-Gbps", type=float, default=Links.ib_Gbps, metavar="X",
                   help="InfiniBand per GPU, each way (default: %(default)s)")
    p.add_argument("--fs-GBps", type=float, default=Links.fs_GBps, metavar="X",
                   help="checkpoint rate of the shared filesystem, all readers or the writer (default: %(default)s)")
    p.add_argument("--tflops", type=float, default=Links.tflops, metavar="X",
                   help="peak bf16 TFLOP/s per GPU (default: %(default)s, H100 SXM dense)")
    p.add_argument("--mfu", type=float, default=Links.mfu, metavar="X",
                   help="share of the peak a step reaches (default: %(default)s)")
    ours, rest = p.parse_known_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(ours, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("nvlink_GBps", "ib_Gbps", "fs_GBps", "tflops", "mfu"):
        if not getattr(ours, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    targs = train.parse_args(rest)
    for k, v in vars(ours).items():
        setattr(targs, k, v)
    return targs


def check(args):
    """The checks train.py would make on this many processes (but not this
    machine's memory: the plan is for other machines)."""
    W = args.nodes * args.gpus_per_node
    ep = plumbing.expert_parallel_size(args, W)
    if args.batch_size % (W * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {W} GPUs x --grad-accum "
                         f"{args.grad_accum}: use a multiple of {W * args.grad_accum}")
    check_config(plumbing.model_config(args), ep, local_seqs=args.batch_size // (W * args.grad_accum))
    return ep


def main(argv=None):
    args = parse_args(argv)
    ep = check(args)
    cfg = plumbing.model_config(args)
    links = Links(args.nvlink_GBps, args.ib_Gbps, args.fs_GBps, args.tflops, args.mfu)
    p = plan(cfg, args.batch_size, args.grad_accum, args.nodes, args.gpus_per_node, ep)
    print("\n".join(report(p, times(p, links), cfg, args, links)))
    return 0


if __name__ == "__main__":
    plumbing.cli(main)
