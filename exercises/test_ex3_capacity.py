"""Checks for exercise 3, token dropping with a capacity (Fedus et al. 2021,
Sec. 2.2): capacity respected per sequence, first come first served, nothing
dropped when there is room, and the model still exactly causal."""

import math

import pytest
import torch

from balancers import BALANCERS, make_balancer
from checking import exercise, leak, tiny_gpt, train_a_little

EXERCISE = "ex3 capacity and token dropping (Fedus et al. 2021, Sec. 2.2)"
HINT = ("start from top_k_routing, whose assignments come token by token, best choice first; give each "
        "assignment its place in its expert's queue within the sequence, then decide what C counts "
        "(tokens or assignments?)")

ex = exercise("ex3_capacity")
Capacity = ex.CapacityTopK


def skewed(B=3, T=16, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, E, generator=g) + torch.linspace(1.5, -1.5, E)


def kept_by_sequence(routing, B, T, E):
    """kept[b][e] = the token positions (in order) whose assignment to e survived."""
    kept = [[[] for _ in range(E)] for _ in range(B)]
    for t, e in sorted(zip(routing.token_idx.tolist(), routing.expert_idx.tolist())):
        kept[t // T][e].append(t % T)
    return kept


@pytest.mark.parametrize("c", [0.5, 1.0, 1.25])
def test_capacity_is_respected_in_every_sequence(c):
    """No expert keeps more than C = ceil(c k T / E) assignments of one sequence."""
    B, T, E, k = 3, 16, 4, 2
    routing = Capacity(E, k, dict(capacity_factor=c)).route(skewed(B, T, E))
    C = math.ceil(c * k * T / E)
    for b, experts in enumerate(kept_by_sequence(routing, B, T, E)):
        for e, positions in enumerate(experts):
            assert len(positions) <= C, \
                f"expert {e} kept {len(positions)} assignments of sequence {b}, more than its capacity C = {C}"
    assert len(routing.token_idx) < B * T * k, "a skewed router at this capacity must drop some assignments"


def test_kept_assignments_are_plain_top_k_with_unscaled_weights():
    """Dropping removes assignments; it never invents or reweights one: what
    is kept is a subset of plain top-k, with the gate score as weight."""
    B, T, E, k = 3, 16, 4, 2
    logits = skewed(B, T, E)
    routing = Capacity(E, k, dict(capacity_factor=0.75)).route(logits)
    plain = make_balancer("none", E, k, {}).route(logits)
    allowed = set(zip(plain.token_idx.tolist(), plain.expert_idx.tolist()))
    pairs = list(zip(routing.token_idx.tolist(), routing.expert_idx.tolist()))
    assert len(set(pairs)) == len(pairs), "an assignment must not appear twice"
    assert set(pairs) <= allowed, "every kept assignment must be one of the token's plain top-k choices"
    s = logits.softmax(-1).reshape(-1, E)
    assert torch.equal(routing.weight, s[routing.token_idx, routing.expert_idx]), \
        "a kept assignment's weight must be its plain gate score"
    assert routing.weight.requires_grad == logits.requires_grad


def test_nothing_is_dropped_from_a_balanced_router_at_capacity_factor_1():
    """C counts assignments, k per token: with capacity factor 1 and a router
    that spreads every sequence perfectly evenly (k T / E each), every
    assignment fits."""
    B, T, E, k = 2, 16, 4, 2
    logits = torch.zeros(B, T, E)
    for t in range(T):                       # token t prefers experts 2t, 2t+1 (mod 4): 8 assignments each
        logits[:, t, (2 * t) % E] = 2.0
        logits[:, t, (2 * t + 1) % E] = 1.0
    routing = Capacity(E, k, dict(capacity_factor=1.0)).route(logits)
    assert len(routing.token_idx) == B * T * k, \
        f"a perfectly balanced router lost {B * T * k - len(routing.token_idx)} of {B * T * k} assignments at " \
        "capacity factor 1: C must be c * k * T / E assignments per expert (k per token), and an expert keeps C"


def test_a_capacity_of_everything_is_plain_top_k():
    """With c = E / k an expert has a slot for every token: nothing is dropped."""
    B, T, E, k = 3, 16, 4, 2
    logits = skewed(B, T, E)
    routing = Capacity(E, k, dict(capacity_factor=E / k)).route(logits)
    plain = make_balancer("none", E, k, {}).route(logits)
    assert torch.equal(routing.token_idx, plain.token_idx) and torch.equal(routing.expert_idx, plain.expert_idx), \
        "with room for every token the routing must be plain top-k, in the same order"


def test_first_come_first_served_in_token_order():
    """Switch's queue: an expert keeps the earliest tokens of the sequence
    that chose it, and drops an assignment only once it is full."""
    B, T, E, k, c = 3, 16, 4, 2, 0.75
    logits = skewed(B, T, E)
    routing = Capacity(E, k, dict(capacity_factor=c)).route(logits)
    plain = make_balancer("none", E, k, {}).route(logits)
    asked = kept_by_sequence(plain, B, T, E)           # every token that chose e, in order
    kept = kept_by_sequence(routing, B, T, E)
    low = math.floor(c * k * T / E)                    # tolerate floor or ceil for C
    for b in range(B):
        for e in range(E):
            n = len(kept[b][e])
            assert kept[b][e] == asked[b][e][:n], \
                f"sequence {b}, expert {e}: kept positions {kept[b][e]} are not the earliest of {asked[b][e]} " \
                "(first come, first served in token order)"
            if n < len(asked[b][e]):
                assert n >= low, \
                    f"sequence {b}, expert {e}: dropped assignments while only {n} of C = {low} slots were used"


def test_model_is_exactly_causal_while_dropping():
    """A token's fate depends only on the tokens before it in its sequence
    (and its own scores), so the model stays exactly causal: train.causal_probe
    reads 0 although many assignments are dropped."""
    assert BALANCERS.get("ex3_capacity_drop") is Capacity, "the file must register BALANCERS['ex3_capacity_drop']"
    model = train_a_little(tiny_gpt("ex3_capacity_drop", capacity_factor=0.5))
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 32, (2, 16)))
    assert min(len(r.token_idx) for r in out.routings) < 2 * 16 * 2, \
        "at capacity factor 0.5 some assignments must be dropped"
    assert leak(model) == 0, \
        "the logits at positions <= t changed when later tokens changed: the queue must run in token order " \
        "(a token's choices before the next token's), so that only earlier tokens can take its slots"


def test_a_dropped_token_passes_through_the_layer_unchanged():
    """A token all of whose assignments were dropped gets exactly nothing from
    the routed experts: the MoE layer's output row is 0, and the block's
    residual connection carries the token on."""
    model = tiny_gpt("ex3_capacity_drop", capacity_factor=0.25)
    layer = model.blocks[0].moe
    with torch.no_grad():
        y, _, routing = layer(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3)))
    served = torch.zeros(32, dtype=torch.bool)
    served[routing.token_idx] = True
    assert (~served).any(), "at capacity factor 0.25 some tokens must lose all their assignments"
    assert torch.equal(y.reshape(32, 16)[~served], torch.zeros(int((~served).sum()), 16))
