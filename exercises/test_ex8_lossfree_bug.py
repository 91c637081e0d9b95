"""Checks for exercise 8, the loss-free balancer with a shipped bug to find
(Wang et al. 2024, Eq. 3 and Alg. 1; deepspeed-course PR #26). Each test
names one property of Loss-Free Balancing; the file is "not started" until
its DIAGNOSIS is written (checking.diagnosed)."""

import torch

from balancers import BALANCERS, gate_scores
from checking import diagnosed, drive, exercise, skewed_logits, tiny_gpt, train_a_little

EXERCISE = "ex8 find the bug: loss-free bias (Wang et al. 2024, Eq. 3)"
HINT = ("compare route() with balancers.top_k_routing and __init__ with LossFree's: the bias has exactly one "
        "job (choosing the top-k). Where else does this file let it act, and who else can move it?")

ex = exercise("ex8_lossfree_bug")


def strategy():
    return diagnosed(ex, 8).BiasSteeredTopK


def with_bias(bal, values):
    with torch.no_grad():
        bal.bias.copy_(torch.as_tensor(values, dtype=torch.float32))
    return bal


def test_bias_gets_no_gradient():
    """Eq. 3: the bias decides which experts win and nothing else, so the
    gate weights, hence the LM loss, do not depend on it. Asked to track a
    gradient (requires_grad on the bias, buffer or not), it must get none."""
    bal = with_bias(strategy()(8, 2), torch.linspace(-0.2, 0.2, 8))
    bal.bias.requires_grad_(True)
    logits = skewed_logits(n_tokens=32).reshape(2, 16, 8).requires_grad_(True)
    bal.route(logits).weight.sum().backward()
    grad = bal.bias.grad
    assert grad is None or not grad.any(), \
        f"the bias got a gradient (norm {grad.norm().item():.3g}): it must only choose the experts, never " \
        f"enter the gate weight (Wang et al. Eq. 3)"


def test_gate_weight_is_the_routers_own_score():
    """With a bias far from zero, each chosen expert's weight is still its
    unbiased gate score s_i (sigmoid by default, as lossfree)."""
    bal = with_bias(strategy()(8, 2), torch.linspace(-0.3, 0.3, 8))
    logits = skewed_logits(n_tokens=32).reshape(2, 16, 8)
    routing = bal.route(logits)
    scores = gate_scores(logits, bal.cfg.gate).reshape(-1, 8)
    want = scores[routing.token_idx, routing.expert_idx]
    assert torch.allclose(routing.weight, want, atol=1e-6), \
        f"the gate weight must be the router's unbiased score of the chosen expert (largest difference " \
        f"{(routing.weight - want).abs().max().item():.3g})"


def test_bias_steers_the_choice():
    """A bias far above the scores' range sends every token to that expert."""
    bal = with_bias(strategy()(8, 1), [0, 0, 0, 5.0, 0, 0, 0, 0])
    routing = bal.route(skewed_logits(n_tokens=32).reshape(2, 16, 8))
    assert (routing.expert_idx == 3).all(), "the bias must steer which experts are chosen"


def test_updates_drive_skewed_router_to_balance():
    """Alg. 1 on a router that does not learn: MaxVio from above 1 to below
    0.2 at the paper's u = 1e-3."""
    vio = drive(strategy()(8, 2), skewed_logits(), 800)
    assert vio[0] > 1.0
    assert max(vio[-20:]) < 0.2, \
        f"800 steps at u = 1e-3 left MaxVio at {max(vio[-20:]):.2f}: step() must move the bias against the load"


def test_bias_is_state_not_a_parameter():
    """The bias is the strategy's state: logged and checkpointed, but no
    optimizer may own it (AdamW would move and decay it) and GPT's weight
    initialisation must not draw it at random."""
    assert BALANCERS.get("ex8_lossfree") is strategy(), "the file must register BALANCERS['ex8_lossfree']"
    model = tiny_gpt("ex8_lossfree")
    params = [name for name, _ in model.named_parameters() if ".balancer." in name]
    assert not params, f"the bias must be the strategy's state (a buffer), not a parameter: {params} would " \
                       f"be initialised at random and trained by the optimizer"
    assert all("bias" in layer.balancer.state() for layer in model.moe_layers()), \
        "the bias must be in the strategy's state (a registered buffer), to be logged and checkpointed"


def test_only_the_sign_rule_moves_the_bias_in_training():
    """A few real training steps: the sign rule moves each bias by exactly u
    per step, so it stays on multiples of u. Anything else that touched it
    (an initialisation, an optimizer) takes it off that grid."""
    strategy()
    u = 0.01
    model = train_a_little(tiny_gpt("ex8_lossfree", bias_rate=u), steps=3)
    for i, layer in enumerate(model.moe_layers()):
        steps = layer.balancer.bias.detach() / u
        off = (steps - steps.round()).abs().max().item()
        assert off < 1e-3, \
            f"layer {i}: the bias must move only by the sign rule, exactly u per step, so it stays on " \
            f"multiples of u (it is {off:.3g} u off that grid; bias {layer.balancer.bias.tolist()})"
    assert any(layer.balancer.bias.abs().max() > 0 for layer in model.moe_layers()), \
        "training steps must move the bias (step() runs once per optimizer step)"
