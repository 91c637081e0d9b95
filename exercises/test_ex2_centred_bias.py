"""Checks for exercise 2, the centred loss-free bias: zero mean, and the same
decisions as plain lossfree (Wang et al. 2024, Alg. 1)."""

import pytest
import torch

from balancers import BALANCERS, LossFree
from checking import drive, exercise, skewed_logits, tiny_gpt, train_a_little

EXERCISE = "ex2 centred bias (Wang et al. 2024, Alg. 1)"
HINT = ("start from LossFree.step's update (both rules). Adding the same number to every expert's bias "
        "changes no top-k decision: which number, taken from the update itself, keeps the bias's mean at 0?")

ex = exercise("ex2_centred_bias")
Centred = ex.CentredLossFree
RULES = ["sign", "proportional"]


@pytest.mark.parametrize("rule", RULES)
def test_bias_stays_zero_mean(rule):
    """Loads whose sign updates do not cancel (one expert above the mean,
    three below: +u three times, -u once): the bias must still have mean 0."""
    bal = Centred(4, 1, dict(bias_rate=0.01, bias_update=rule))
    for load in ([13, 1, 1, 1], [1, 7, 4, 4], [0, 0, 0, 16]) * 10:
        bal.step(torch.tensor(load))
        assert abs(bal.bias.mean().item()) < 1e-6, \
            f"the bias must stay zero-mean after every step (mean {bal.bias.mean().item():.3g} after load {load})"
    assert bal.bias.abs().max() > 0.01, "the bias must move: step() should add the (centred) update"


def test_bias_falls_for_a_busy_expert_and_rises_for_an_idle_one():
    """Alg. 1's direction survives centring: relative to the others, an
    overloaded expert's bias goes down and an underloaded one's up."""
    bal = Centred(4, 1, dict(bias_rate=0.01))
    bal.step(torch.tensor([10, 2, 6, 6]))             # mean 6
    b = bal.bias.tolist()
    assert b[0] < b[2] < b[1] and b[2] == b[3], \
        f"an overloaded expert's bias must fall relative to the others and an underloaded one's rise (got {b})"


@pytest.mark.parametrize("rule", RULES)
def test_same_decisions_as_plain_lossfree(rule):
    """Side by side with balancers.LossFree on a skewed router, step after
    step: the two biases must differ by one constant shared by every expert
    (so every top-k decision is the same), and the routings must be equal."""
    knobs = dict(bias_rate=0.01, bias_update=rule)
    centred, plain = Centred(8, 2, knobs), LossFree(8, 2, knobs)
    logits = skewed_logits()
    for step in range(150):
        a, b = centred.route(logits), plain.route(logits)
        assert torch.equal(a.expert_idx, b.expert_idx), \
            f"step {step}: the centred bias chose different experts from plain lossfree"
        load = torch.bincount(a.expert_idx, minlength=8)
        centred.step(load)
        plain.step(load)
        gap = centred.bias - plain.bias
        assert (gap - gap.mean()).abs().max() < 1e-5, \
            f"step {step}: the centred bias must be plain lossfree's bias minus one shared constant " \
            f"(differences {(gap - gap.mean()).tolist()})"


def test_updates_drive_skewed_router_to_balance():
    """Centring changes no decision, so the balance is lossfree's: MaxVio
    from above 1 to below 0.2 at the paper's u = 1e-3."""
    vio = drive(Centred(8, 2, {}), skewed_logits(), 800)
    assert vio[0] > 1.0
    assert max(vio[-20:]) < 0.2, \
        f"800 steps at u = 1e-3 left MaxVio at {max(vio[-20:]):.2f}: the router is not being balanced"


def test_bias_is_zero_mean_in_every_layer_of_a_trained_model():
    """In the model, GPT.end_step() calls step() once per optimizer step with
    each layer's load: every layer's bias must come out zero-mean."""
    assert BALANCERS.get("ex2_lossfree_centred") is Centred, "the file must register BALANCERS['ex2_lossfree_centred']"
    model = train_a_little(tiny_gpt("ex2_lossfree_centred", bias_rate=0.01), steps=4)
    assert any(layer.balancer.bias.abs().max() > 0 for layer in model.moe_layers()), \
        "training steps must move the bias (step() runs once per optimizer step)"
    for i, layer in enumerate(model.moe_layers()):
        bias = layer.balancer.bias
        assert abs(bias.mean().item()) < 1e-6, \
            f"layer {i}: the bias must stay zero-mean (mean {bias.mean().item():.3g})"
