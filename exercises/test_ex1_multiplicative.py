"""Checks for exercise 1, the multiplicative bias (Wang et al. 2024, Sec. 4.3).
Each test names one property of a correct solution; none depends on how
route() or step() is written."""

import torch

from balancers import BALANCERS
from checking import drive, exercise, leak, skewed_logits, tiny_gpt, train_a_little

EXERCISE = "ex1 multiplicative bias (Wang et al. 2024, Sec. 4.3)"
HINT = ("read balancers.top_k_routing: one tensor decides which experts win, another is the weight -- which of "
        "the two may the multiplier touch? For step(): an expert stays busy for a thousand steps; what must "
        "never happen to its multiplier?")

ex = exercise("ex1_multiplicative")
Mult = ex.MultiplicativeBias


def chosen_sets(routing, n_tokens):
    chosen = [set() for _ in range(n_tokens)]
    for t, e in zip(routing.token_idx.tolist(), routing.expert_idx.tolist()):
        chosen[t].add(e)
    return chosen


def test_multiplier_steers_choice_but_gate_weight_is_unscaled_score():
    """Expert i is chosen if s_i * m_i is in the top-k; the weight that scales
    its output is s_i itself."""
    B, T, E, k = 2, 6, 4, 2
    logits = torch.randn(B, T, E, generator=torch.Generator().manual_seed(5))
    bal = Mult(E, k, {})
    bal.mult.copy_(torch.tensor([1.0, 1.0, 1.0, 2.0]))
    routing = bal.route(logits)
    s = torch.sigmoid(logits).reshape(-1, E)
    assert routing.token_idx.tolist() == torch.arange(B * T).repeat_interleave(k).tolist(), \
        "every token must get exactly k assignments, listed token by token"
    chosen = chosen_sets(routing, B * T)
    assert chosen == [set(r) for r in (s * bal.mult).topk(k, -1).indices.tolist()], \
        "the chosen experts must be each token's top-k of s * mult (the multiplier steers the choice)"
    assert chosen != [set(r) for r in s.topk(k, -1).indices.tolist()], \
        "a multiplier of 2 on one expert must change some choices"
    assert torch.equal(routing.weight, s[routing.token_idx, routing.expert_idx]), \
        "the gate weight must be the unscaled score s, not s * mult (the multiplier only chooses)"
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(B, T))


def test_multiplier_gets_no_gradient():
    """The multiplier is state: even when autograd is told to track it,
    backpropagating the model's loss gives it no gradient, because it never
    enters a value (the router still gets one)."""
    model = tiny_gpt("ex1_mult_bias")
    bal = model.blocks[0].moe.balancer
    bal.mult.copy_(torch.tensor([1.2, 0.8, 1.1, 0.9]))
    assert not any(p is bal.mult for p in model.parameters()), "the multiplier must be a buffer, not a parameter"
    bal.mult.requires_grad_(True)
    x = torch.randint(0, 32, (2, 16))
    out = model(x, x)
    (out.lm_loss + out.balance_loss).backward()
    assert model.blocks[0].moe.router.weight.grad.abs().sum() > 0
    assert bal.mult.grad is None, "the multiplier got a gradient: it entered the forward value (use it only to choose)"


def test_step_moves_multiplier_against_the_load_by_about_u():
    """After a batch, a busy expert's multiplier goes down, an idle one's up,
    one exactly at the mean stays; the relative move is of the order of u."""
    u = 0.01
    bal = Mult(4, 1, dict(bias_rate=u))
    bal.step(torch.tensor([10, 2, 6, 6]))              # mean 6: expert 0 busy, 1 idle, 2 and 3 at the mean
    m = bal.mult
    assert m[0] < 1 < m[1], \
        f"an overloaded expert's multiplier must go down and an underloaded one's up (got {m.tolist()})"
    assert m[2] == 1 and m[3] == 1, f"an expert exactly at the mean load must keep its multiplier (got {m.tolist()})"
    for i in (0, 1):
        assert 0.5 * u <= abs(m[i].item() - 1) <= 2 * u, \
            f"one step must move the multiplier by about u = {u} relative to its value (got {m.tolist()})"
    before = bal.mult.clone()
    bal.step(torch.tensor([10, 2, 6, 6]))
    rel = (bal.mult - before) / before
    assert 0.5 * u <= abs(rel[0].item()) <= 2 * u, "the move must stay relative to the current multiplier"


def test_multiplier_stays_positive_when_an_expert_stays_busy():
    """A negative multiplier would turn an expert's preference upside down
    (it would win the tokens that score it lowest). However many steps an
    expert stays overloaded, its multiplier must stay above 0."""
    bal = Mult(4, 1, dict(bias_rate=0.1))
    for _ in range(60):
        bal.step(torch.tensor([13, 1, 1, 1]))
    assert (bal.mult > 0).all(), \
        f"the multiplier of an always-busy expert became {bal.mult[0].item():.3g}: it must stay positive"
    assert bal.mult[0] < bal.mult[1], "the busy expert must end with the smaller multiplier"


def test_updates_drive_skewed_router_to_balance():
    """A router with a strong fixed preference (expert 0 >> expert 7): steps
    at the paper's rate u = 1e-3 must bring MaxVio from above 1 to below 0.2."""
    vio = drive(Mult(8, 2, {}), skewed_logits(), 800)
    assert vio[0] > 1.0
    assert max(vio[-20:]) < 0.2, \
        f"800 steps at u = 1e-3 left MaxVio at {max(vio[-20:]):.2f}: the router is not being balanced"


def test_model_is_exactly_causal():
    """The multiplier comes from past batches and a token's choice depends
    only on its own scores: changing later tokens must not move earlier
    logits by a single bit (train.causal_probe reads exactly 0)."""
    assert BALANCERS.get("ex1_mult_bias") is Mult, "the file must register the class as BALANCERS['ex1_mult_bias']"
    model = train_a_little(tiny_gpt("ex1_mult_bias", bias_rate=0.1))
    assert any((layer.balancer.mult != 1).any() for layer in model.moe_layers()), \
        "training steps must change the multiplier (step() runs once per optimizer step)"
    assert leak(model) == 0, "the logits at positions <= t changed when later tokens changed: the routing is not causal"
