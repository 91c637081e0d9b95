"""Tests for balancers.py: each strategy's routing rule, its loss and its
once-per-step update, checked against the papers' formulas on inputs small
enough to work out by hand. (The multi-process properties of global_aux and
lossfree are in test_parallel.py.)"""

import math

import pytest
import torch

from balancers import (BALANCERS, LossFree, expert_capacity, fresh_permutation, gate_scores,
                       make_balancer, switch_loss)
from moe import GPT, GPTConfig
from train import max_violation

# The fast tier: python -m pytest -m lesson
pytestmark = pytest.mark.lesson

# Derived from the registry: a new strategy joins the tests that apply to it.
WITH_BIAS = [n for n, c in BALANCERS.items() if issubclass(c, LossFree)]
WITH_ALPHA = [n for n, c in BALANCERS.items() if "alpha" in c.knobs]
TOKEN_CHOICE = [n for n, c in BALANCERS.items() if c.token_choice]


def random_logits(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def per_token_experts(routing, n_tokens):
    """The set of experts each token was assigned to."""
    chosen = [set() for _ in range(n_tokens)]
    for t, e in zip(routing.token_idx.tolist(), routing.expert_idx.tolist()):
        chosen[t].add(e)
    return chosen


# ----------------------------------------------------------------------------
# Token choice (none, aux, global_aux): top-k of the gate scores.

@pytest.mark.parametrize("strategy", TOKEN_CHOICE)
def test_token_choice_sends_each_token_to_its_k_highest_scores(strategy):
    """Token choice: every token goes to exactly its k best-scoring experts,
    weighted by that score (before any bias has been learnt)."""
    B, T, E, k = 2, 5, 6, 2
    logits = random_logits(B, T, E)
    bal = make_balancer(strategy, E, k, {})
    routing = bal.route(logits)
    scores = gate_scores(logits, bal.cfg.gate).reshape(-1, E)
    assert torch.equal(routing.token_idx, torch.arange(B * T).repeat_interleave(k))
    best = scores.topk(k, dim=-1).indices
    assert per_token_experts(routing, B * T) == [set(row) for row in best.tolist()]
    torch.testing.assert_close(routing.weight, scores[routing.token_idx, routing.expert_idx])
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(B, T))


@pytest.mark.parametrize("strategy", list(BALANCERS))
def test_scratch_buffers_are_back_to_zero_after_step(strategy):
    """state() is what a checkpoint keeps. A buffer registered with
    persistent=False is left out of it, so it must hold nothing once the
    optimizer step is over (global_aux's count buffer is reset by step());
    otherwise a resumed run would silently start from a different state."""
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                    top_k=2, d_expert=8, balancer=strategy)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    out = model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    (out.lm_loss + out.balance_loss).backward()
    model.end_step()
    for layer in model.moe_layers():
        kept = layer.balancer.state()
        for name, buf in layer.balancer.named_buffers():
            if name not in kept:
                assert not buf.any(), f"{strategy}: scratch buffer {name} not reset by step()"


# ----------------------------------------------------------------------------
# The auxiliary loss (Fedus et al. 2021, Sec. 2.2).

@pytest.mark.parametrize("strategy", WITH_ALPHA)
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2)])
def test_uniform_router_costs_exactly_alpha(strategy, E, k):
    """With f normalised by k*T, a router that scores every expert equally
    (P_i = 1/E) scores N_E * sum_i f_i / E = 1 whatever f is: the loss is
    exactly alpha, each strategy's default alpha included (Switch 1e-2,
    DeepSeek-V3's sequence-wise loss 1e-4)."""
    logits = torch.zeros(4, 6, E)
    for alpha in (None, 0.25):
        bal = make_balancer(strategy, E, k, dict(alpha=alpha)).train()
        loss = bal.loss(bal.route(logits))
        expected = BALANCERS[strategy].knobs["alpha"].default if alpha is None else alpha
        assert loss.item() == torch.tensor(expected, dtype=torch.float32).item()


def test_aux_loss_matches_hand_worked_example():
    """One balance group of 4 tokens, 2 experts, top-1. Logits (ln 3, 0) give
    probabilities (3/4, 1/4). Three tokens prefer expert 0, one expert 1:
        f = (3/4, 1/4)
        P = ((3 * 3/4 + 1/4) / 4, (3 * 1/4 + 3/4) / 4) = (5/8, 3/8)
        LBL = alpha * N_E * (f . P) = 0.01 * 2 * (15/32 + 3/32) = 0.01125"""
    ln3 = math.log(3.0)
    logits = torch.tensor([[[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    bal = make_balancer("aux", 2, 1, dict(alpha=0.01, balance_seqs=1))
    routing = bal.route(logits)
    assert routing.expert_idx.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(bal.loss(routing), torch.tensor(0.01125), rtol=1e-6, atol=0)


def test_sigmoid_aux_loss_uses_wang_eq_2_raw_scores_for_P():
    """Wang et al. 2024, Eq. 2: P_i = (1/T) sum_t s_{i,t} with the sigmoid
    scores themselves, not renormalised per token. The example above with the
    sigmoid gate: sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2, the same choices, so
        f = (3/4, 1/4)
        P = ((3 * 3/4 + 1/2) / 4, (3 * 1/2 + 3/4) / 4) = (11/16, 9/16)
        LBL = 0.01 * 2 * (33/64 + 9/64) = 0.013125
    (the normalised scores (3/5, 2/5) would give 0.0105)."""
    ln3 = math.log(3.0)
    logits = torch.tensor([[[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    bal = make_balancer("aux", 2, 1, dict(alpha=0.01, balance_seqs=1, gate="sigmoid"))
    routing = bal.route(logits)
    assert routing.expert_idx.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(bal.loss(routing), torch.tensor(0.013125), rtol=1e-6, atol=0)


def test_two_layer_models_balance_loss_is_the_sum_of_its_layers():
    """Switch Sec. 2.2: "for each Switch layer, this auxiliary loss is added to
    the total model loss", each with the full alpha; not their mean."""
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                    top_k=2, d_expert=8, balancer="aux", balance=dict(alpha=0.5, balance_seqs=1))
    torch.manual_seed(0)
    model = GPT(cfg).train()
    out = model(torch.randint(0, 32, (2, 8)))
    layers = [layer.balancer.loss(r) for layer, r in zip(model.moe_layers(), out.routings)]
    assert min(layers) > 0
    torch.testing.assert_close(out.balance_loss, layers[0] + layers[1], rtol=1e-6, atol=0)


def test_aux_loss_gradient_flows_only_through_mean_probability():
    """Only P carries gradient; f is a count (Fedus et al. 2021, Sec. 2.2).
    The gradient w.r.t. the logits must equal that of alpha * N_E * f . P with
    f counted by hand and held constant, P the per-group mean softmax."""
    B, T, E, k, seqs, alpha = 4, 5, 4, 2, 2, 1.0
    logits = random_logits(B, T, E, seed=1, scale=2.0).requires_grad_()
    bal = make_balancer("aux", E, k, dict(alpha=alpha, balance_seqs=seqs))
    routing = bal.route(logits)
    bal.loss(routing).backward()

    ref_logits = logits.detach().clone().requires_grad_()
    n_groups, group_tokens = B // seqs, seqs * T
    f = torch.zeros(n_groups, E)
    for t, e in zip(routing.token_idx.tolist(), routing.expert_idx.tolist()):
        f[t // group_tokens, e] += 1.0 / (k * group_tokens)
    P = ref_logits.softmax(-1).reshape(n_groups, group_tokens, E).mean(1)
    ref = alpha * E * (f * P).sum(-1).mean()
    ref.backward()
    assert ref_logits.grad.abs().max() > 1e-3
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-8)


def test_aux_loss_is_mean_over_balance_groups():
    """Qiu et al. 2025: aux balances within groups of `balance_seqs`
    sequences, so the batch loss is the mean of the groups' own losses. Two
    groups that each use different experts are penalised, although the batch
    as a whole is balanced: that is what blocks domain specialisation."""
    E, k = 4, 1
    lean = torch.tensor([3.0, 3.0, 0.0, 0.0])
    logits = torch.cat([random_logits(2, 6, E, seed=2) + lean,
                        random_logits(2, 6, E, seed=3) + lean.flip(0)])
    cfg = dict(balance_seqs=2)
    bal = make_balancer("aux", E, k, cfg)
    whole = bal.loss(bal.route(logits))
    halves = [bal.loss(bal.route(part)) for part in logits.split(2)]
    torch.testing.assert_close(whole, torch.stack(halves).mean(), rtol=1e-6, atol=0)
    one_group = make_balancer("aux", E, k, dict(balance_seqs=4))
    assert one_group.loss(one_group.route(logits)) < 0.8 * whole


@pytest.mark.parametrize("strategy,knob", [(n, k) for n, c in BALANCERS.items()
                                           for k in ("balance_seqs", "route_seqs") if k in c.knobs])
def test_group_size_must_divide_local_batch(strategy, knob):
    """A group that straddles micro-batches cannot be formed: refuse, naming
    the setting, rather than silently using a smaller group."""
    bal = make_balancer(strategy, 4, 2, dict(**{knob: 2}))
    with pytest.raises(ValueError, match="--" + knob.replace("_", "-")):
        bal.route(torch.zeros(3, 4, 4))


def test_sequence_aux_loss_balances_each_sequence_separately():
    """DeepSeek-V3 (Sec. 2.1.2): f and P are computed within each sequence,
    so the loss is the mean of single-sequence losses."""
    E, k = 4, 2
    logits = random_logits(3, 7, E, seed=4, scale=2.0)
    bal = make_balancer("seq_aux", E, k, dict(alpha=0.5))
    whole = bal.loss(bal.route(logits))
    per_seq = [bal.loss(bal.route(seq)) for seq in logits.split(1)]
    torch.testing.assert_close(whole, torch.stack(per_seq).mean(), rtol=1e-6, atol=0)


def test_sequence_aux_counts_f_over_the_unbiased_top_k_deepseek_v3_eq_18():
    """DeepSeek-V3 Eq. 18: f_i counts 1(s_{i,t} in Topk({s_{j,t}}, K)), the
    top-k of the unbiased scores. With a bias of 5 on experts 0 and 1 every
    token is *routed* to (0, 1), counts (16, 16, 0, ...), but the loss must
    use the counts of the scores themselves, here (1, 3, 2, 4, 5, 7, 5, 5):
    each token's two experts get logit 2, the others -2. P (Eq. 19) is the
    mean of s / sum_j s_j, which takes two values per token."""
    E, k, alpha = 8, 2, 0.5
    pairs = [(0, 5), (1, 5), (1, 5), (1, 5), (2, 5), (2, 5), (3, 5), (3, 7), (3, 4), (3, 4),
             (4, 6), (4, 6), (4, 7), (6, 7), (6, 7), (6, 7)]
    logits = torch.full((1, len(pairs), E), -2.0)
    for t, pair in enumerate(pairs):
        logits[0, t, list(pair)] = 2.0
    counts = torch.bincount(torch.tensor(pairs).flatten(), minlength=E)
    assert counts.tolist() == [1, 3, 2, 4, 5, 7, 5, 5]
    bal = make_balancer("seq_aux", E, k, dict(alpha=alpha))
    bal.bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    routing = bal.route(logits)
    assert torch.bincount(routing.expert_idx, minlength=E).tolist() == [16, 16, 0, 0, 0, 0, 0, 0]
    T, hi, lo = len(pairs), 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    total = 2 * hi + (E - 2) * lo                                  # sum_j s_{j,t}, the same for every token
    f = counts.double() * E / (k * T)                              # Eq. 18's N_r / (K_r T) normalisation
    P = (counts.double() * hi + (T - counts.double()) * lo) / (T * total)
    expected = alpha * (f * P).sum()                               # Eq. 20
    torch.testing.assert_close(bal.loss(routing).double(), expected, rtol=1e-6, atol=0)


def test_global_aux_evaluation_leaves_count_buffer_alone():
    """Qiu et al. 2025, Alg. 1: the buffer holds the training batch's counts;
    a validation forward pass in the middle of a step must not add to it."""
    bal = make_balancer("global_aux", 4, 2, {})
    bal.train()
    bal.loss(bal.route(random_logits(2, 5, 4)))
    seen = bal.seen.clone()
    assert seen.sum() == 2 * 5 * 2
    bal.eval()
    bal.loss(bal.route(random_logits(2, 5, 4, seed=9)))
    assert torch.equal(bal.seen, seen)


# ----------------------------------------------------------------------------
# Loss-Free Balancing (Wang et al. 2024).

@pytest.mark.parametrize("strategy", WITH_BIAS)
def test_bias_steers_choice_but_gate_weight_is_unbiased_sigmoid_score(strategy):
    """Wang et al. 2024, Eq. 3: expert i is chosen if s_i + b_i is in the
    top-k, but the weight multiplying its output is the unbiased s_i."""
    B, T, E, k = 2, 6, 4, 2
    logits = random_logits(B, T, E, seed=5)
    bal = make_balancer(strategy, E, k, {})
    bal.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.3]))
    routing = bal.route(logits)
    scores = torch.sigmoid(logits).reshape(-1, E)
    biased_best = (scores + bal.bias).topk(k, dim=-1).indices
    unbiased_best = scores.topk(k, dim=-1).indices
    chosen = per_token_experts(routing, B * T)
    assert chosen == [set(row) for row in biased_best.tolist()]
    assert chosen != [set(row) for row in unbiased_best.tolist()], "the bias should change some choices"
    assert torch.equal(routing.weight, scores[routing.token_idx, routing.expert_idx])


@pytest.mark.parametrize("strategy", WITH_BIAS)
def test_bias_gets_no_gradient(strategy):
    """The bias is state, not a parameter: it is not in parameters(), and even
    when autograd is asked to track it, backpropagating the layer's output and
    loss gives it no gradient -- it only chooses experts, it never enters a
    value (Wang et al. 2024, Eq. 3)."""
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=1, d_model=16, n_heads=2, n_experts=4,
                    top_k=2, d_expert=8, balancer=strategy)
    torch.manual_seed(0)
    model = GPT(cfg)
    bal = model.blocks[0].moe.balancer
    bal.bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
    assert not any(p is bal.bias for p in model.parameters())
    assert not any(".balancer." in name for name, _ in model.named_parameters())
    bal.bias.requires_grad_(True)           # if the bias entered any value, it would now get a gradient
    out = model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    (out.lm_loss + out.balance_loss).backward()
    assert model.blocks[0].moe.router.weight.grad.abs().sum() > 0
    assert bal.bias.grad is None


@pytest.mark.parametrize("strategy", WITH_BIAS)
def test_bias_changes_output_only_through_which_experts_are_chosen(strategy):
    """Two biases that lead to the same choices (one is the other plus a
    constant) must give bit-identical outputs and losses: the bias never
    enters the forward value, so the LM gradient is not disturbed."""
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                    top_k=2, d_expert=8, balancer=strategy)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 32, (2, 8))
    bias = random_logits(4, seed=6, scale=0.05)
    outs = []
    for shift in (0.0, 0.5):
        for layer in model.moe_layers():
            layer.balancer.bias.copy_(bias + shift)
        outs.append(model(idx, idx))
    for r0, r1 in zip(outs[0].routings, outs[1].routings):
        assert torch.equal(r0.expert_idx, r1.expert_idx)
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[0].balance_loss, outs[1].balance_loss)


def test_lossfree_step_moves_bias_by_exactly_u_against_the_load():
    """Wang et al. 2024, Alg. 1: e_i = mean(c) - c_i, b_i += u * sign(e_i). An
    overloaded expert goes down by exactly u, an underloaded one up by
    exactly u, one at the mean stays. (u = 1/32 is exact in binary.)"""
    u = 1 / 32
    bal = make_balancer("lossfree", 4, 1, dict(bias_rate=u))
    assert bal.bias.dtype == torch.float32
    bal.step(torch.tensor([10, 2, 6, 6]))            # mean 6
    assert bal.bias.tolist() == [-u, u, 0.0, 0.0]
    bal.step(torch.tensor([1, 1, 1, 9]))             # mean 3
    assert bal.bias.tolist() == [0.0, 2 * u, u, -u]


def test_proportional_update_moves_bias_by_u_times_error_over_mean_load():
    """Wang et al. 2024, Sec. 4.3 and App. C.2 (their softmax-gate choice):
    b_i += u * e_i, here over mean(c). Unlike the sign rule, a far-off expert moves further. (u = 1/32
    and these loads keep the arithmetic exact in binary.)"""
    u = 1 / 32
    bal = make_balancer("lossfree", 4, 1, dict(bias_rate=u, bias_update="proportional"))
    bal.step(torch.tensor([14, 2, 8, 8]))            # mean 8: e = (-6, 6, 0, 0)
    assert bal.bias.tolist() == [-6 * u / 8, 6 * u / 8, 0.0, 0.0]
    bal.step(torch.tensor([4, 4, 4, 4]))             # balanced: no move
    assert bal.bias.tolist() == [-6 * u / 8, 6 * u / 8, 0.0, 0.0]


def test_lossfree_default_rate_is_paper_value():
    """u = 1e-3 (Wang et al. 2024, Sec. 3): 1e-4 converges too slowly, 1e-2
    oscillates late in training."""
    bal = make_balancer("lossfree", 2, 1, {})
    bal.step(torch.tensor([3, 1]))
    assert torch.equal(bal.bias, torch.tensor([-1e-3, 1e-3], dtype=torch.float32))


def test_lossfree_updates_drive_skewed_router_to_balance():
    """A router with a strong, fixed preference (expert 0 >> expert 7):
    repeated bias updates at the paper's rate must bring MaxVio from above 1
    to below 0.2 -- the point of Loss-Free Balancing."""
    E, k = 8, 2
    logits = random_logits(1, 512, E, seed=7) + torch.linspace(2.0, -2.0, E)
    bal = make_balancer("lossfree", E, k, {})
    vio = []
    for _ in range(800):
        load = torch.bincount(bal.route(logits).expert_idx, minlength=E)
        vio.append(max_violation(load).item())
        bal.step(load)
    assert vio[0] > 1.0
    assert max(vio[-20:]) < 0.2


def lossfree_model(seed=0):
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                    top_k=2, d_expert=8, balancer="lossfree")
    torch.manual_seed(seed)
    return GPT(cfg)


def test_lossfree_bias_is_fp32_state_that_survives_state_dict_round_trip():
    """The bias is training state: it must be saved in checkpoints (a resumed
    run that forgot it would restart balancing from zero) and kept in fp32,
    where steps of u = 1e-3 are not rounded away."""
    import io
    model = lossfree_model()
    for i, layer in enumerate(model.moe_layers()):
        layer.balancer.bias.copy_(torch.tensor([1e-3, -2e-3, 7e-3, 0.0]) * (i + 1))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    for i in range(2):
        assert state[f"blocks.{i}.moe.balancer.bias"].dtype == torch.float32
    fresh = lossfree_model(seed=1)
    fresh.load_state_dict(state)
    for old, new in zip(model.moe_layers(), fresh.moe_layers()):
        assert new.balancer.bias.dtype == torch.float32
        assert torch.equal(new.balancer.bias, old.balancer.bias)


def test_evaluation_does_not_count_load_or_move_bias():
    """Count tokens in training mode only: validation batches must not steer
    the bias (Wang et al. 2024 update from the training batch)."""
    model = lossfree_model()
    idx = torch.randint(0, 32, (2, 8))
    model.eval()
    with torch.no_grad():
        model(idx)
    for layer in model.moe_layers():
        assert layer.load.sum() == 0
    assert model.end_step().sum() == 0
    for layer in model.moe_layers():
        assert torch.equal(layer.balancer.bias, torch.zeros(4))
    model.train()
    model(idx)
    for layer in model.moe_layers():
        assert layer.load.sum() == 2 * 8 * 2


# ----------------------------------------------------------------------------
# Expert choice (Zhou et al. 2022).

@pytest.mark.parametrize("B,T,seqs,E,c", [(4, 8, 2, 4, 2.0),    # n=16: C=8
                                          (2, 6, 1, 4, 1.0),    # n=6:  C=round(1.5)=2
                                          (4, 5, 4, 8, 0.5),    # n=20: C=round(1.25)=1
                                          (2, 3, 2, 2, 4.0)])   # n=6:  C=12, capped at 6
def test_expert_choice_gives_every_expert_exactly_C_tokens_per_group(B, T, seqs, E, c):
    """Zhou et al. 2022, Sec. 3.2: each expert takes the C = n*c/E tokens of
    its routing group that score it highest, so the load is perfectly even;
    the gate is the raw softmax score of the chosen pair."""
    n = seqs * T
    C = expert_capacity(n, c, E)
    assert C == max(1, min(n, round(n * c / E)))
    logits = random_logits(B, T, E, seed=8)
    routing = make_balancer("expert_choice", E, 1, dict(capacity_factor=c, route_seqs=seqs)).route(logits)
    scores = logits.softmax(-1).reshape(-1, E)
    for g in range(B // seqs):
        in_group = (routing.token_idx // n) == g
        for e in range(E):
            picked = routing.token_idx[in_group & (routing.expert_idx == e)]
            assert len(picked) == C
            assert len(set(picked.tolist())) == C
            best = scores[g * n:(g + 1) * n, e].topk(C).indices + g * n
            assert set(picked.tolist()) == set(best.tolist())
    assert torch.bincount(routing.expert_idx, minlength=E).tolist() == [C * B // seqs] * E
    torch.testing.assert_close(routing.weight, scores[routing.token_idx, routing.expert_idx])


# ----------------------------------------------------------------------------
# Settings a newcomer gets wrong.

# Each strategy's own knobs, with a bad value for each: the knobs a class
# lists in `defaults` are the ones it must check.
BAD_VALUES = {"alpha": [-1.0, float("nan")], "balance_seqs": [0], "bias_rate": [-1.0, float("nan"), 1e30],
              "bias_update": ["sometimes"], "capacity_factor": [0.0, -1.0, float("inf")], "route_seqs": [0],
              "z_loss": [-1e-3, float("inf")], "gate": ["relu"]}
BAD_SETTINGS = [(name, knob, value) for name, c in BALANCERS.items() for knob in c.knobs
                for value in BAD_VALUES.get(knob, [])]


@pytest.mark.parametrize("strategy,knob,value", BAD_SETTINGS)
def test_bad_strategy_setting_raises_value_error_naming_it(strategy, knob, value):
    """A mistake is reported as a ValueError that names the flag to change,
    by the strategy that reads the knob."""
    with pytest.raises(ValueError, match="--" + knob.replace("_", "-")):
        make_balancer(strategy, 4, 2, dict(**{knob: value}))


@pytest.mark.parametrize("strategy", list(BALANCERS))
def test_top_k_outside_one_to_n_experts_is_refused(strategy):
    for top_k in (0, 5):
        with pytest.raises(ValueError, match="top_k"):
            make_balancer(strategy, 4, top_k, {})


@pytest.mark.parametrize("strategy", list(BALANCERS))
def test_a_knob_the_strategy_does_not_read_is_refused(strategy):
    """Setting --alpha on lossfree would otherwise be silently ignored."""
    unread = [f for f in BAD_VALUES if f not in BALANCERS[strategy].knobs]
    for knob in unread:
        good = {"gate": "softmax", "bias_update": "sign"}.get(knob, 1)
        with pytest.raises(ValueError, match=f"does not apply to {strategy}"):
            make_balancer(strategy, 4, 2, dict(**{knob: good}))


def test_unknown_strategy_raises_value_error_listing_choices():
    """An unknown name fails with the list of valid strategies."""
    with pytest.raises(ValueError, match="--balancer switch: no such strategy.*lossfree"):
        make_balancer("switch", 4, 2, {})


def test_gate_scores_rejects_unknown_gate():
    """Only the two gates of the papers exist: softmax and sigmoid."""
    with pytest.raises(ValueError, match="gate"):
        gate_scores(torch.zeros(1, 1, 2), "tanh")


def test_route_shuffle_draws_a_new_permutation_every_step_and_another_in_evaluation():
    """Wang et al.'s shuffled control scatters tokens over routing groups. One
    fixed permutation for every call would make the control's "shuffled"
    evaluation its own training regime: the draw must change with the
    optimizer step, and evaluation must never reuse a training draw. Two
    balancers at the same step draw the same (a resumed run repeats itself)."""
    E, logits = 4, random_logits(4, 8, 4, seed=10)
    make = lambda: make_balancer("expert_choice", E, 1, dict(route_seqs=1, route_shuffle=True))
    bal, twin = make().train(), make().train()
    groups = lambda routing: sorted(tuple(sorted(g)) for g in routing.token_idx.view(4, -1).tolist())
    first = groups(bal.route(logits))
    assert first == groups(twin.route(logits))
    bal.step(torch.zeros(E))
    second = groups(bal.route(logits))
    evaluated = groups(bal.eval().route(logits))
    assert len({tuple(map(tuple, g)) for g in (first, second, evaluated)}) == 3
    assert bal.steps_done.item() == 1 and "steps_done" in bal.state()


def test_shuffle_lbl_micro_counts_f_on_random_tokens_and_p_on_the_groups_own():
    """Qiu et al. 2025, Table 2 and Sec. 5, Shuffle LBL_micro: "randomly
    select a batch of tokens ... to calculate the expert selection
    frequency": group g's f counts the picks of the tokens the step's
    permutation puts in slot group g (the micro-batch's token count drawn
    from the whole batch), its P is the mean score of its own sequence's
    tokens. The groups change with the step."""
    B, T, E, k = 4, 6, 4, 2
    logits = random_logits(B, T, E, seed=11) + 3 * torch.eye(E)[:, None, :]     # sequence b leans to expert b
    bal = make_balancer("aux", E, k, dict(alpha=0.5, balance_seqs=1, balance_shuffle=True)).train()
    losses = []
    for step in range(2):
        routing = bal.route(logits)
        order = fresh_permutation(B * T, step, 0, True, "cpu")
        chosen = logits.reshape(-1, E)[order].topk(k, dim=-1).indices.view(B, T * k)    # the groups' picks
        counts = torch.stack([torch.bincount(g, minlength=E) for g in chosen])
        expected = 0.5 * switch_loss(counts, logits.softmax(-1))           # P: each group's own sequence
        losses.append(bal.loss(routing))
        torch.testing.assert_close(losses[-1], expected, rtol=1e-6, atol=0)
        bal.step(torch.zeros(E))
    assert losses[0] != losses[1]
    unshuffled = make_balancer("aux", E, k, dict(alpha=0.5, balance_seqs=1))
    assert unshuffled.loss(unshuffled.route(logits)) > max(losses)     # a leaning sequence costs more alone


def test_expert_choice_over_chunks_of_tokens_routes_each_chunk_as_its_own_group():
    """Wang et al. 2024, App. D.2: routing groups shorter than a sequence
    (--route-tokens). Each chunk of n consecutive tokens is routed alone,
    C = n c / E tokens per expert; a prefix ending inside a chunk (causal
    evaluation, generation) routes its partial chunk as a group of its own."""
    E, k, n = 8, 2, 4
    logits = random_logits(2, 12, E, seed=5)
    bal = make_balancer("expert_choice", E, k, dict(route_tokens=n, capacity_factor=2.0))
    whole = bal.route(logits)
    for start in range(0, 12, n):
        alone = bal.route(logits[:, start:start + n])                    # [2, n]: one chunk of each sequence
        rows = alone.token_idx // n * 12 + start + alone.token_idx % n
        want = sorted(zip(rows.tolist(), alone.expert_idx.tolist()))
        got = sorted((t, e) for t, e in zip(whole.token_idx.tolist(), whole.expert_idx.tolist())
                     if start <= t % 12 < start + n)
        assert got == want
    prefix = bal.route(logits[:, :6])                                    # a chunk of 4, then a partial one of 2
    tail = bal.route(logits[:, 4:6])
    assert sorted((t // 6, t % 6 - 4, e) for t, e in zip(prefix.token_idx.tolist(), prefix.expert_idx.tolist())
                  if t % 6 >= 4) == sorted((t // 2, t % 2, e) for t, e in zip(tail.token_idx.tolist(),
                                                                             tail.expert_idx.tolist()))
