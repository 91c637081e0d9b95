"""
lab/demons.py -- the demons gallery: load-balancing bugs that shipped in
widely used MoE code, each rebuilt as a named wrong variant of this
project's code, with what it does in numbers.

    python -m lab.demons                 # the gallery: each demon, its threads, its symptom
    python -m lab.demons f_not_divided_by_k
    python train.py --import lab/demon_strategies.py --balancer demon_folded_bias   # train with one

Each demon is a strategy subclass (a drop-in --balancer, registered only by
lab/demon_strategies.py, never by the lesson) or, for the one that is not a
per-layer strategy, a function beside the project's own. Each has a
`symptom()` that builds the situation the bug needs and returns the numbers
that show it, next to the project's code on the same input; the tests
(tests/test_demons.py) hold every demon to its symptom, and docs/demons.md
cites the threads and says how the project's code avoids each one.
Nothing in the lesson imports this file.
"""

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from balancers import AuxLoss, LossFree, counts_per_group, gate_scores, switch_loss, top_k_routing
from train import max_violation


# ----------------------------------------------------------------------------
# 1. The router logits of all layers pooled into one aux loss.

def pooled_layers_loss(routings, top_k, alpha=1e-2):
    """The wrong one (Hugging Face's load_balancing_loss_func as first
    shipped): every layer's gate logits concatenated, and one Switch loss
    over the lot, as if expert i of layer 1 and expert i of layer 2 were one
    expert. Layers that collapse onto different experts cancel out."""
    logits = torch.cat([r.logits.reshape(-1, r.logits.shape[-1]) for r in routings])
    return alpha * switch_loss_of(logits, top_k)


def per_layer_loss(routings, top_k, alpha=1e-2):
    """The project's: the same loss on each layer's own tokens, summed over
    layers (GPT.forward adds every layer's balance loss)."""
    return sum(alpha * switch_loss_of(r.logits.reshape(-1, r.logits.shape[-1]), top_k) for r in routings)


def switch_loss_of(logits, top_k):
    """N_E * sum_i f_i P_i over one pool of tokens [N, E], f of the top-k."""
    E = logits.shape[-1]
    probs = logits.softmax(-1)
    counts = F.one_hot(probs.topk(top_k, dim=-1).indices, E).sum((0, 1))
    return switch_loss(counts[None], probs[None])


def collapsed_layers(n_layers=4, n_experts=4, tokens=64, margin=4.0, seed=0):
    """Routings of a model whose layer l sends every token to expert l: each
    layer fully collapsed, each onto a different expert. Logits with grad."""
    g = torch.Generator().manual_seed(seed)
    routings = []
    for layer in range(n_layers):
        logits = torch.randn(1, tokens, n_experts, generator=g) * 0.1
        logits[..., layer % n_experts] += margin
        logits.requires_grad_(True)
        routings.append(top_k_routing(logits, logits.softmax(-1), 1))
    return routings


def pooled_layers_symptom():
    routings = collapsed_layers()
    E = routings[0].logits.shape[-1]
    loads = torch.stack([torch.bincount(r.expert_idx, minlength=E) for r in routings])
    out = {"maxvio_by_layer": max_violation(loads).tolist(),
           "maxvio_pooled": max_violation(loads.sum(0)).item()}
    for name, fn in (("pooled", pooled_layers_loss), ("per_layer", per_layer_loss)):
        loss = fn(routings, 1, alpha=1.0)
        grads = torch.autograd.grad(loss, [r.logits for r in routings])
        out[f"{name}_loss"] = loss.item()
        out[f"{name}_grad_norm"] = torch.stack([g.norm() for g in grads]).norm().item()
    return out


# ----------------------------------------------------------------------------
# 2. f not divided by k.

class FNotDividedByK(AuxLoss):
    """aux with f_i = (tokens sent to i) / T instead of / (k T): the f of
    top-k routing sums to k, not 1, so the loss, and with it alpha, is k
    times what the paper means; a perfectly balanced router scores k, not 1."""
    summary = "demon: aux loss with f not divided by k"

    def loss(self, routing):
        B, T, E = routing.probs.shape
        group_tokens = self.cfg.balance_seqs * T
        counts = counts_per_group(routing, group_tokens, E)
        f = counts.float() / group_tokens                      # the bug: / T, not / (k T)
        P = gate_scores(routing.logits, self.cfg.gate).reshape(-1, group_tokens, E).mean(1)
        return self.cfg.alpha * E * (f * P).sum(-1).mean()


def f_not_divided_by_k_symptom(top_k=2):
    # A router that cannot tell the experts apart (zero logits): the balanced case.
    logits = torch.zeros(4, 16, 8)
    knobs = {"alpha": 1.0}
    return {"top_k": top_k, "project_loss": AuxLoss(8, top_k, knobs)(logits)[1].item(),
            "demon_loss": FNotDividedByK(8, top_k, knobs)(logits)[1].item()}


# ----------------------------------------------------------------------------
# 3. The aux loss scaled by the data-parallel world size.

class WorldSizeScaled(AuxLoss):
    """aux multiplied by the number of data-parallel processes, as a loss
    "averaged" over ranks by a sum would be: the same global batch trains
    with a stronger balance loss on 2 processes than on 1."""
    summary = "demon: aux loss scaled by the world size"

    def loss(self, routing):
        return self.world_size * super().loss(routing)


def world_size_scaled_symptom():
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 8)
    out = {}
    for cls, name in ((AuxLoss, "project"), (WorldSizeScaled, "demon")):
        for W in (1, 2):
            out[f"{name}_loss_{W}_process"] = cls(8, 2, {"alpha": 1.0}, world_size=W)(logits)[1].item()
    return out


# ----------------------------------------------------------------------------
# 4. Expert counts all-reduced in bf16: the bias update flips sign.

def bf16_all_reduce(per_rank):
    """What summing the ranks' counts in bf16 gives: each rank's count
    rounded to bf16 and the running sum rounded again (a ring all-reduce adds
    one rank at a time in the tensor's dtype). Above 256 bf16 cannot hold
    every integer, and above 512 it holds only every fourth."""
    total = torch.zeros_like(per_rank[0], dtype=torch.bfloat16)
    for counts in per_rank:
        total = total + counts.to(torch.bfloat16)
    return total


class Bf16Counts(LossFree):
    """lossfree whose step sees counts that went through bf16 (Megatron had
    tokens_per_expert all-reduced in the router's dtype). One process: the
    counts are rounded (at the tiny preset's sizes, under 256, nothing
    happens); with several, the rounded partial sums can swap the order of
    two experts' loads and the bias moves the wrong way."""
    summary = "demon: lossfree fed counts that went through bf16"

    def step(self, load):
        super().step(load.to(torch.bfloat16).float())

    def step_from_ranks(self, per_rank):
        """The update from the ranks' own counts, summed in bf16."""
        LossFree.step(self, bf16_all_reduce(per_rank).float())


# Two ranks' counts for two experts: exactly, expert 0 has 1018 and expert 1
# has 1019 (expert 0 is underloaded); summed in bf16 they read 1020 and 1016.
BF16_RANKS = [torch.tensor([500, 502]), torch.tensor([518, 517])]


def bf16_counts_symptom():
    exact = LossFree(2, 1)
    exact.step(BF16_RANKS[0] + BF16_RANKS[1])
    demon = Bf16Counts(2, 1)
    demon.step_from_ranks(BF16_RANKS)
    return {"exact_counts": (BF16_RANKS[0] + BF16_RANKS[1]).tolist(),
            "bf16_counts": bf16_all_reduce(BF16_RANKS).float().tolist(),
            "project_bias_update": exact.bias.tolist(), "demon_bias_update": demon.bias.tolist()}


# ----------------------------------------------------------------------------
# 5. The bias folded into the gate weight.

class FoldedBias(LossFree):
    """lossfree with the bias a parameter and added to the scores that weigh
    the experts' outputs, not only to those that choose them. The bias is
    now part of the forward value: the LM loss sends it gradient, AdamW moves
    it (and decays it), and the sign rule no longer owns it."""
    summary = "demon: lossfree bias folded into the gate weight"

    def __init__(self, n_experts, top_k, knobs=None, world_size=1):
        super().__init__(n_experts, top_k, knobs, world_size)
        del self.bias
        self.bias = nn.Parameter(torch.zeros(n_experts))

    def route(self, logits):
        biased = gate_scores(logits, self.cfg.gate) + self.bias     # the bug: the weight sees the bias
        return top_k_routing(logits, biased, self.top_k)

    def step(self, load):
        with torch.no_grad():
            super().step(load)


def folded_bias_symptom():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8, requires_grad=True)
    out = {}
    for cls, name in ((LossFree, "project"), (FoldedBias, "demon")):
        bal = cls(8, 2)
        # Ask for the bias's gradient even where it is a buffer: the project's
        # must get none, because its bias only picks the top-k.
        bal.bias.requires_grad_(True)
        routing, _ = bal(logits)
        routing.weight.sum().backward()
        out[f"{name}_bias_grad"] = None if bal.bias.grad is None else bal.bias.grad.norm().item()
    return out


# ----------------------------------------------------------------------------
# 6. A sequence-wise aux loss silently zero: a config key that was missing.

class SilentZero(AuxLoss):
    """aux whose coefficient is looked up under a name nobody sets, with a
    default of 0: the loss is computed, logged and added, and is always
    exactly 0, so the run is `none` under another name."""
    summary = "demon: aux loss whose coefficient silently defaults to 0"

    def loss(self, routing):
        coefficient = vars(self.cfg).get("aux_loss_coeff", 0.0)    # the bug: the knob is called alpha
        return coefficient / self.cfg.alpha * super().loss(routing)


def silent_zero_symptom():
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 8)
    out = {"demon_loss": SilentZero(8, 2)(logits)[1].item(), "project_loss": AuxLoss(8, 2)(logits)[1].item()}
    try:
        AuxLoss(8, 2, {"aux_loss_coeff": 1e-2})
        out["project_refuses_the_unknown_key"] = False
    except ValueError:
        out["project_refuses_the_unknown_key"] = True
    return out


# ----------------------------------------------------------------------------
# The gallery.

@dataclass(frozen=True)
class Demon:
    name: str
    threads: tuple           # where it was reported or fixed
    what: str                # the bug in one line
    symptom: object          # () -> {figure: number}
    strategy: type = None    # a drop-in --balancer (demon_NAME), if it is one


DEMONS = {d.name: d for d in [
    Demon("pooled_layers", ("Hugging Face transformers #28255, #31464", "Qwen3 #1418"),
          "the router logits of all layers pooled into one aux loss", pooled_layers_symptom),
    Demon("f_not_divided_by_k", ("OLMoE #45", "minimind #290"),
          "f_i counts a token k times but is divided by T, not k T", f_not_divided_by_k_symptom, FNotDividedByK),
    Demon("world_size_scaled", ("Hugging Face transformers #48690", "Megatron-LM PR #3768",
                                "NeMo Automodel PR #1412, #3359"),
          "the aux loss multiplied by the data-parallel world size", world_size_scaled_symptom, WorldSizeScaled),
    Demon("bf16_counts", ("Megatron-LM PR #7081", "Megatron-LM #1482"),
          "expert counts summed over ranks in bf16: the bias update flips sign", bf16_counts_symptom, Bf16Counts),
    Demon("folded_bias", ("deepspeed-course PR #26 (a course notebook)",),
          "the lossfree bias added to the gate weight too, so it gets gradient", folded_bias_symptom, FoldedBias),
    Demon("silent_zero", ("Megatron-Bridge PR #5165",),
          "an aux coefficient read under a key nobody sets: the loss is silently 0", silent_zero_symptom, SilentZero),
]}


def strategy_name(demon):
    return f"demon_{demon.name}"


def register_demons():
    """Make the strategy demons --balancer choices (demon_NAME). Only
    lab/demon_strategies.py calls this: the lesson's registry stays clean."""
    from balancers import register
    for demon in DEMONS.values():
        if demon.strategy is not None:
            register(strategy_name(demon), demon.strategy)


def show(demon):
    lines = [f"{demon.name}: {demon.what}", f"  threads: {', '.join(demon.threads)}"]
    for key, value in demon.symptom().items():
        shown = f"{value:.4g}" if isinstance(value, float) else \
            [round(v, 4) if isinstance(v, float) else v for v in value] if isinstance(value, list) else value
        lines.append(f"  {key}: {shown}")
    if demon.strategy is not None:
        lines.append(f"  train with it: python train.py --import lab/demon_strategies.py --balancer "
                     f"{strategy_name(demon)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="The demons gallery: shipped balancing bugs and their symptoms "
                                            "(docs/demons.md).")
    p.add_argument("names", nargs="*", metavar="NAME", help=" | ".join(DEMONS) + " (default: all)")
    args = p.parse_args(argv)
    for name in args.names:
        if name not in DEMONS:
            p.error(f"no demon {name!r}: the gallery has {', '.join(DEMONS)}")
    torch.set_printoptions(precision=4)
    print("\n\n".join(show(DEMONS[n]) for n in args.names or DEMONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
