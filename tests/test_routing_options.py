"""The two options of token-choice routing that any token-choice strategy
takes (balancers.TOKEN_CHOICE_KNOBS): DeepSeek-V3's group-limited routing
and GShard/Switch capacity with a drop policy. Hand-worked inputs first,
then what they do to a model: the dropped count it reports, and causality."""

import math

import pytest
import torch

import train
from balancers import (BALANCERS, TOKEN_CHOICE_KNOBS, count_per_expert, limit_to_groups, make_balancer,
                       top_k_routing)
from moe import GPT, GPTConfig
from plumbing.health import Health, health_line

pytestmark = pytest.mark.lesson


def route(choice_scores, k, **options):
    """top_k_routing on one sequence of hand-written scores [T, E]."""
    s = torch.tensor(choice_scores, dtype=torch.float32)[None]
    return top_k_routing(s.log(), s, k, **options)


# ----------------------------------------------------------------------------
# Group-limited routing.

# Four experts in two groups {0, 1} and {2, 3}. Expert 0 is the token's best,
# but its group sums to 0.9 + 0.0 against 0.5 + 0.45 = 0.95 for the other.
LOSES_THE_VOTE = [[0.9, 0.0, 0.5, 0.45]]


def test_a_token_whose_best_expert_loses_the_group_vote_goes_to_the_winning_group():
    assert route(LOSES_THE_VOTE, 1).expert_idx.tolist() == [0]                      # plain top-1
    assert route(LOSES_THE_VOTE, 1, n_groups=2, topk_groups=1).expert_idx.tolist() == [2]
    assert route(LOSES_THE_VOTE, 1, n_groups=2, topk_groups=2).expert_idx.tolist() == [0]   # every group kept


def test_the_group_vote_uses_the_biased_scores_and_the_weight_stays_unbiased():
    # A bias of +0.2 on expert 1 lifts group {0, 1} to 1.1 > 0.95: expert 0 wins again.
    r = route(LOSES_THE_VOTE, 1, n_groups=2, topk_groups=1, choice_bias=torch.tensor([0.0, 0.2, 0.0, 0.0]))
    assert r.expert_idx.tolist() == [0] and r.weight.tolist() == pytest.approx([0.9])


def test_dropped_groups_are_masked_with_minus_infinity_so_negative_biased_scores_cannot_revive_them():
    s = torch.tensor(LOSES_THE_VOTE)[None]
    choice = s - 1.0                                        # biased scores, all negative: -0.1, -1, -0.5, -0.55
    masked = limit_to_groups(choice, 1, 2, 1)
    assert masked[0, 0, :2].tolist() == [float("-inf")] * 2
    # The hazard: filled with 0.0, the dropped group's experts would beat every kept one.
    zero_filled = torch.where(torch.isinf(masked), torch.zeros_like(masked), masked)
    assert zero_filled.argmax(-1).item() in (0, 1)
    r = route(LOSES_THE_VOTE, 1, n_groups=2, topk_groups=1, choice_bias=torch.full((4,), -1.0))
    assert r.expert_idx.tolist() == [2]


def test_groups_that_do_not_fit_the_layer_are_refused_naming_the_flags():
    with pytest.raises(ValueError, match="--n-groups 3 must divide"):
        make_balancer("lossfree", 8, 2, {"n_groups": 3})
    with pytest.raises(ValueError, match="--topk-groups 1"):      # 1 group of 2 experts cannot hold top-4
        make_balancer("aux", 8, 4, {"n_groups": 4, "topk_groups": 1})
    make_balancer("aux", 8, 2, {"n_groups": 4, "topk_groups": 1})


def test_the_routing_options_are_knobs_of_the_token_choice_strategies_only():
    for name in ("none", "aux", "global_aux", "lossfree", "seq_aux", "quantile", "momentum_bias"):
        assert set(TOKEN_CHOICE_KNOBS) <= set(BALANCERS[name].knobs), name
    for name in ("expert_choice", "threshold"):                # they would ignore them
        assert not set(TOKEN_CHOICE_KNOBS) & set(BALANCERS[name].knobs), name
    with pytest.raises(ValueError, match="--n-groups does not apply to expert_choice"):
        make_balancer("expert_choice", 8, 2, {"n_groups": 2})


# ----------------------------------------------------------------------------
# Capacity and drops.

# Two experts, top-1, four tokens that all prefer expert 0 (scores 0.6, 0.9,
# 0.7, 0.8). Capacity 1.0: C = ceil(1.0 * 4 * 1 / 2) = 2 assignments per expert.
ALL_WANT_EXPERT_0 = [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]


def test_capacity_by_probs_keeps_each_experts_highest_scores():
    r = route(ALL_WANT_EXPERT_0, 1, expert_capacity=1.0, drop_policy="probs")
    assert r.token_idx.tolist() == [1, 3] and r.expert_idx.tolist() == [0, 0]     # 0.9 and 0.8, in token order
    assert r.weight.tolist() == pytest.approx([0.9, 0.8]) and r.dropped == 2


def test_capacity_by_position_keeps_each_experts_earliest_tokens():
    r = route(ALL_WANT_EXPERT_0, 1, expert_capacity=1.0, drop_policy="position")
    assert r.token_idx.tolist() == [0, 1] and r.dropped == 2


def test_a_larger_capacity_drops_less_and_zero_is_dropless():
    assert route(ALL_WANT_EXPERT_0, 1, expert_capacity=1.5).dropped == 1            # C = 3
    r = route(ALL_WANT_EXPERT_0, 1)
    assert r.dropped == 0 and r.token_idx.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity", [0.5, 1.0, 1.25])
def test_every_expert_keeps_exactly_the_smaller_of_its_demand_and_c(policy, capacity):
    torch.manual_seed(0)
    B, T, E, k = 3, 10, 8, 2
    logits = torch.randn(B, T, E) * 2
    plain = top_k_routing(logits, logits.softmax(-1), k)
    r = top_k_routing(logits, logits.softmax(-1), k, expert_capacity=capacity, drop_policy=policy)
    C = math.ceil(capacity * B * T * k / E)
    demand = count_per_expert(plain.expert_idx, E)
    assert torch.equal(count_per_expert(r.expert_idx, E), demand.clamp(max=C))
    assert r.dropped == B * T * k - r.expert_idx.numel() == int((demand - C).clamp(min=0).sum())
    assert (r.token_idx[1:] >= r.token_idx[:-1]).all()        # still listed token by token


# ----------------------------------------------------------------------------
# In a model.

def model_with(seed, seqs=2, **options):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, seq_len=12, n_layers=2, d_model=16, n_heads=2, n_experts=4, top_k=2,
                    d_expert=8, balancer="lossfree", balance=options)
    return GPT(cfg), torch.randint(0, 64, (seqs, 12), generator=torch.Generator().manual_seed(seed))


def test_the_model_reports_the_assignments_it_dropped_per_layer():
    model, x = model_with(0, expert_capacity=0.5)
    model.train()
    routings = [model(x).routings for _ in range(2)]              # two micro-steps
    want = [sum(r[layer].dropped for r in routings) for layer in range(2)]
    loads, _ = model.end_step(entropy=True)
    assert model.last_dropped.tolist() == want and all(w > 0 for w in want)
    assert loads.sum(1).tolist() == [2 * 2 * 12 * 2 - w for w in want]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_group_limited_model_is_exactly_causal(seed):
    model, x = model_with(seed, n_groups=2, topk_groups=1)
    with torch.no_grad():
        assert train.causal_probe(model, x, 5, torch.Generator().manual_seed(seed)) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_by_position_over_one_sequence_is_exactly_causal(seed):
    """Kept or dropped then depends only on the earlier tokens of the one
    sequence: exercise 3's rule, where each sequence is its own group."""
    model, x = model_with(seed, seqs=1, expert_capacity=0.5, drop_policy="position")
    with torch.no_grad():
        assert any(r.dropped for r in model(x).routings)
        assert train.causal_probe(model, x, 5, torch.Generator().manual_seed(seed)) == 0.0


@pytest.mark.parametrize("policy,seqs", [("probs", 1), ("position", 2)])
def test_capacity_over_a_batch_leaks_the_future_like_expert_choice(policy, seqs):
    """Not causal: by probs, whether token t keeps its expert depends on how
    later tokens score it; by position over two sequences, whether the second
    sequence's early tokens are kept depends on the whole first sequence,
    later positions included. The probe sees it, as it sees expert choice's."""
    leaks = []
    for seed in range(3):
        model, x = model_with(seed, seqs=seqs, expert_capacity=0.5, drop_policy=policy)
        with torch.no_grad():
            leaks.append(train.causal_probe(model, x, 5, torch.Generator().manual_seed(seed)))
    assert max(leaks) > 0


def test_health_logs_each_steps_dropped_count_and_summary_json_the_runs_total():
    health = Health(n_layers=2, n_experts=4, tokens_per_step=8)
    load = torch.tensor([[4, 4, 4, 4], [8, 4, 2, 2]])
    figures, _ = health.update(1, load, torch.zeros(2), {}, dropped=torch.tensor([0, 3]))
    assert figures["dropped"] == [0, 3] and "dropped 3 assignments (worst layer 1)" in health_line(figures, 4)
    figures, _ = health.update(2, load, torch.zeros(2), {}, dropped=torch.tensor([1, 2]))
    assert health.summary()["dropped_by_layer"] == [1, 5]
    figures, _ = health.update(3, load, torch.zeros(2), {})                     # dropless: zeros, no mention
    assert figures["dropped"] == [0, 0] and "dropped" not in health_line(figures, 4)
