"""Tests for strategies/: the load-balancing methods since 2024 (Quantile
Balancing, SMEBU, Expert Threshold routing), each update or routing rule
checked against its source's equation on inputs small enough to work out by
hand. The registry-wide tests (test_balancers.py, test_moe.py,
test_train.py, test_parallel.py) take the three from the registry too."""

import math

import pytest
import torch

import train
from balancers import make_balancer
from distributed import run_distributed
from moe import GPT, GPTConfig, MoELayer, swiglu
from strategies.quantile import histogram_bin, level_exceeded_by

pytestmark = pytest.mark.lesson


def chosen_experts(routing, n_tokens):
    """The set of experts each token was sent to."""
    chosen = [set() for _ in range(n_tokens)]
    for t, e in zip(routing.token_idx.tolist(), routing.expert_idx.tolist()):
        chosen[t].add(e)
    return chosen


def load_of(routing, n_experts):
    return torch.bincount(routing.expert_idx, minlength=n_experts).tolist()


# ----------------------------------------------------------------------------
# The histogram that turns a global batch into one statistic per expert.

def test_histogram_level_has_exactly_count_values_above_when_they_fall_in_separate_bins():
    """Values .7, .3, 0, -.1, -.5 in bins of width 1/4 on each side of 0
    (span 1, 4 a side, 0 alone in bin 4): bins 7, 6, 4, 3, 2. With count 2
    the level is 0's own, exactly 0, and two values lie above it; count 3:
    the top of -.1's bin [-1/4, 0), i.e. 0 again, three values above;
    count 1.5 takes half of .3's bin (1/4, 1/2]: .375; count 5: -1."""
    values = torch.tensor([[0.7, 0.3, 0.0, -0.1, -0.5]])
    bins = histogram_bin(values, 1.0, 4)
    assert bins.tolist() == [[7, 6, 4, 3, 2]]
    hist = torch.zeros(1, 9, dtype=torch.long).scatter_add_(1, bins, torch.ones_like(bins))
    assert level_exceeded_by(hist, 2, 1.0).tolist() == [0.0]
    assert level_exceeded_by(hist, 3, 1.0).tolist() == [0.0]
    assert level_exceeded_by(hist, 1.5, 1.0).tolist() == [0.375]
    assert level_exceeded_by(hist, 5, 1.0).tolist() == [-1.0]


# ----------------------------------------------------------------------------
# Quantile Balancing (Su, "MoE Journey" part 6; Megatron-LM).

# Six tokens, three experts, top-1: each expert's quota is mk/n = 6 * 1 / 3 = 2.
QB_SCORES = torch.tensor([[0.9, 0.5, 0.1],
                          [0.8, 0.55, 0.2],
                          [0.7, 0.3, 0.4],
                          [0.6, 0.2, 0.5],
                          [0.3, 0.9, 0.1],
                          [0.5, 0.1, 0.8]])


def test_quantile_step_is_su_exact_coordinate_step_on_a_hand_worked_batch():
    """Su, part 6, from beta = 0:
        alpha_i = 2nd largest of s_i      = .5, .55, .4, .5, .3, .5
        column 0 of s - alpha: .4, .25, .3, .1, 0, 0    3rd largest .25
        column 1:              0, 0, -.1, -.3, .6, -.4  3rd largest 0
        column 2:              -.4, -.35, 0, 0, -.2, .3 3rd largest 0
    so beta = (.25, 0, 0), re-centred to mean 0: (1/6, -1/12, -1/12). The
    histogram finds each to within a bin (width 1/4096)."""
    bal = make_balancer("quantile", 3, 1).train()
    bal.count_margins(QB_SCORES[None])
    bal.step(torch.tensor([4, 1, 1]))
    width = 1 / bal.cfg.bins
    expected = torch.tensor([0.25, 0.0, 0.0])
    expected -= expected.mean()
    assert (bal.beta - expected).abs().max() <= width
    assert abs(bal.beta.sum()) < 1e-7


def test_quantile_routes_by_top_k_of_s_minus_beta_with_the_unbiased_score_as_weight():
    """Su's sign: the top-k of s - beta choose, the gate weight is s itself.
    With beta = (.2, -.1, .05), s - beta is
        (.7, .6, .05)  (.6, .65, .15)  (.5, .4, .35)  (.4, .3, .45)  (.1, 1, .05)  (.3, .2, .75)
    so tokens 1 and 3 leave expert 0 (their best score) for experts 1 and 2:
    two tokens each."""
    bal = make_balancer("quantile", 3, 1, dict(gate="sigmoid"))
    bal.beta.copy_(torch.tensor([0.2, -0.1, 0.05]))
    logits = torch.logit(QB_SCORES.double()).float()[None]
    routing = bal.route(logits)
    scores = torch.sigmoid(logits).reshape(-1, 3)
    assert chosen_experts(routing, 6) == [{0}, {1}, {0}, {2}, {1}, {2}]
    assert torch.equal(routing.weight, scores[routing.token_idx, routing.expert_idx])


@pytest.mark.parametrize("start", [0.0, 0.3])
def test_quantile_one_step_balances_two_experts_top_1_on_the_batch_it_saw(start):
    """With two experts and top-1, alpha_i is the other expert's shifted
    score, so the column condition s_ij - beta_j > alpha_i is the routing
    condition itself: after one step each expert gets mk/n tokens of the
    batch it was computed on, from any beta. (With more experts alpha moves
    when beta does, and one step is one step of coordinate descent.)"""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 16, 2, generator=g) + torch.tensor([0.0, 1.0])    # skewed towards expert 1
    bal = make_balancer("quantile", 2, 1).train()
    bal.beta.copy_(torch.tensor([start, -start]))
    before = load_of(bal.route(logits), 2)
    bal.step(torch.tensor(before))
    assert before != [32, 32]
    assert load_of(bal.route(logits), 2) == [32, 32]


def test_quantile_steps_bring_a_skewed_batch_close_to_balance():
    """Eight experts, top-2, a batch leaning hard towards the last experts
    (the worst is 73 tokens off the quota mk/n = 64): each step on the same
    batch brings the worst expert closer, the first one by more than half,
    and five bring it within 15% of the quota."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, 8, generator=g) + torch.linspace(0, 1.5, 8)
    bal = make_balancer("quantile", 8, 2).train()
    worst = []
    for _ in range(6):
        load = load_of(bal.route(logits), 8)
        worst.append(max(abs(n - 64) for n in load))
        bal.step(torch.tensor(load))
    assert worst[0] > 40 and worst[1] < worst[0] / 2, worst
    assert all(b <= a for a, b in zip(worst, worst[1:])) and worst[-1] < 0.15 * 64, worst


# ----------------------------------------------------------------------------
# SMEBU (Arcee, Trinity Large report, Eqs. 23-28).

def test_momentum_bias_step_is_trinity_eqs_23_to_28_on_hand_worked_loads():
    """n = (10, 40, 10, 20), mean 20: v = (.5, -1, .5, 0); kappa v = (1, -2,
    1, 0); tanh: (t1, -t2, t1, 0) with t1 = tanh 1, t2 = tanh 2; minus their
    mean (2 t1 - t2) / 4; times lambda = 5e-4. m = (1 - .5) db, b = m. A
    second step with the same loads: m = .5 m + .5 db = 1.5 m, b = 2.5 m."""
    bal = make_balancer("momentum_bias", 4, 2)
    t1, t2 = math.tanh(1.0), math.tanh(2.0)
    soft = torch.tensor([t1, -t2, t1, 0.0], dtype=torch.float64)
    db = 5e-4 * (soft - (2 * t1 - t2) / 4)
    load = torch.tensor([10, 40, 10, 20])
    bal.step(load)
    torch.testing.assert_close(bal.momentum.double(), 0.5 * db, rtol=1e-6, atol=0)
    torch.testing.assert_close(bal.bias.double(), 0.5 * db, rtol=1e-6, atol=0)
    bal.step(load)
    torch.testing.assert_close(bal.momentum.double(), 0.75 * db, rtol=1e-6, atol=0)
    torch.testing.assert_close(bal.bias.double(), 1.25 * db, rtol=1e-6, atol=0)
    assert abs(bal.bias.sum()) < 1e-9


def direction_reversals(strategy, loads):
    """How often expert 0's bias step changes sign over a sequence of loads."""
    bal = make_balancer(strategy, 4, 2)
    steps = []
    for load in loads:
        before = bal.bias[0].item()
        bal.step(load)
        steps.append(bal.bias[0].item() - before)
    return sum(a * b < 0 for a, b in zip(steps, steps[1:]))


def test_momentum_bias_reverses_direction_less_often_than_the_sign_rule_on_an_oscillating_load():
    """Expert 0 is 30% over the mean on even steps and 10% under it on odd
    ones: overloaded on average. The sign rule follows each step and flips
    its bias step 19 times in 20; SMEBU's soft clamp weighs the small dip
    less than the large excess and its momentum carries the excess over the
    dip, so its step keeps pointing down."""
    loads = [torch.tensor([130, 90, 90, 90]) if s % 2 == 0 else torch.tensor([90, 110, 100, 100])
             for s in range(20)]
    sign, smebu = direction_reversals("lossfree", loads), direction_reversals("momentum_bias", loads)
    assert sign == 19 and smebu == 0


# ----------------------------------------------------------------------------
# Expert Threshold routing (Sun et al. 2026).

def test_threshold_routes_token_to_every_expert_whose_logit_clears_its_threshold():
    """Sun et al.: token t uses expert i iff r_ti > c_i, weight sigmoid(r_ti),
    not normalised. c = (0, 1, -.5):
        (.5, .5, -1)   -> expert 0
        (-.2, 1.5, 0)  -> experts 1 and 2
        (-1, .2, -.7)  -> none (the residual carries it)
        (2, 3, 1)      -> all three."""
    bal = make_balancer("threshold", 3, 2)
    bal.threshold.copy_(torch.tensor([0.0, 1.0, -0.5]))
    bal.updates.fill_(1)
    logits = torch.tensor([[[0.5, 0.5, -1.0], [-0.2, 1.5, 0.0], [-1.0, 0.2, -0.7], [2.0, 3.0, 1.0]]])
    routing = bal.route(logits)
    assert chosen_experts(routing, 4) == [{0}, {1, 2}, set(), {0, 1, 2}]
    assert torch.equal(routing.weight, torch.sigmoid(logits[0][routing.token_idx, routing.expert_idx]))


def test_threshold_routes_plain_top_k_before_its_first_update():
    """No average yet: each token takes its top_k experts by gate score."""
    logits = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    routing = make_balancer("threshold", 6, 2).route(logits)
    best = logits.reshape(-1, 6).topk(2, dim=-1).indices
    assert chosen_experts(routing, 10) == [set(row) for row in best.tolist()]


def test_threshold_routing_of_a_token_does_not_depend_on_other_tokens():
    """Change every other token's logits: token 3's experts and weights stay."""
    g = torch.Generator().manual_seed(2)
    bal = make_balancer("threshold", 8, 2)
    bal.threshold.copy_(torch.randn(8, generator=g) * 0.5)
    bal.updates.fill_(3)
    logits = torch.randn(1, 12, 8, generator=g)
    other = torch.randn(1, 12, 8, generator=g)
    other[0, 3] = logits[0, 3]

    def token_3(routing):
        mine = routing.token_idx == 3
        return routing.expert_idx[mine].tolist(), routing.weight[mine].tolist()

    a, b = bal.route(logits), bal.route(other)
    assert len(token_3(a)[0]) > 0 and a.expert_idx.tolist() != b.expert_idx.tolist()
    assert token_3(a) == token_3(b)


def test_threshold_update_is_a_bias_corrected_ema_of_each_batch_level():
    """Two experts, top-1, 8 tokens: C = 8 * 1 / 2 = 4 tokens per expert. The
    level x that 4 of a column's logits exceed sits at or just above its 5th
    largest (within a bin): batch 1 gives x1 = (-.5, .1), batch 2 gives
    x2 = (.3, -.9). With beta = .5, Adam's correction m_t / (1 - beta^t):
        c1 = .5 x1 / .5 = x1
        c2 = (.25 x1 + .5 x2) / .75 = (x1 + 2 x2) / 3 = (.0333, -.5667)."""
    col1 = torch.tensor([[2.0, 1.0], [1.0, 0.8], [0.5, 0.6], [0.0, 0.4], [-0.5, 0.1],
                         [-1.0, -0.3], [-2.0, -0.6], [-3.0, -0.9]])
    col2 = torch.tensor([[1.5, 0.0], [1.2, -0.2], [0.9, -0.4], [0.6, -0.6], [0.3, -0.9],
                         [-0.1, -1.2], [-0.4, -1.5], [-0.8, -1.8]])
    bal = make_balancer("threshold", 2, 1, dict(threshold_ema=0.5)).train()
    width = 8 / bal.cfg.bins
    x1, x2 = torch.tensor([-0.5, 0.1]), torch.tensor([0.3, -0.9])
    bal.route(col1[None])
    bal.step(torch.tensor([4, 4]))
    assert bal.updates == 1 and ((bal.threshold - x1) >= 0).all() and ((bal.threshold - x1) <= width).all()
    bal.route(col2[None])
    bal.step(torch.tensor([4, 4]))
    assert bal.updates == 2
    assert (bal.threshold - (x1 + 2 * x2) / 3).abs().max() <= width
    assert not bal.hist.any()


def test_threshold_default_decay_replaces_the_threshold_at_the_first_update():
    """beta = 0.99: the weight (1 - beta) / (1 - beta^1) is exactly 1, so the
    first threshold is the first batch's level, not 1% of it."""
    bal = make_balancer("threshold", 2, 1).train()
    bal.route(torch.tensor([[[2.0, 1.0], [1.0, 0.8], [0.5, 0.6], [0.0, 0.4]]]))
    bal.step(torch.tensor([2, 2]))
    assert ((bal.threshold - torch.tensor([0.5, 0.6])) >= 0).all()
    assert ((bal.threshold - torch.tensor([0.5, 0.6])) <= 8 / bal.cfg.bins).all()


def threshold_model(seed):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, seq_len=12, n_layers=2, d_model=16, n_heads=2, n_experts=4, top_k=2,
                    d_expert=8, balancer="threshold")
    model = GPT(cfg).eval()
    for layer in model.moe_layers():            # a threshold learnt from past batches
        layer.balancer.threshold.copy_(torch.randn(4) * 0.05)
        layer.balancer.updates.fill_(5)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_model_is_exactly_causal(seed):
    """The causality probe (train.causal_probe) reads exactly 0: changing the
    tokens after t leaves every logit at positions <= t bit for bit alone,
    though a token gets 0 to E experts."""
    model = threshold_model(seed)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        per_token = [torch.bincount(r.token_idx, minlength=24) for r in model(x).routings]
        assert train.causal_probe(model, x, 5, torch.Generator().manual_seed(seed)) == 0.0
    assert any((n != 2).any() for n in per_token), "the thresholds should give some token other than k experts"


def naive_layer(layer, x, routing):
    """y_t = sum over t's (t, e) assignments of s_te * SwiGLU_e(x_t), one
    token at a time: the MoE layer as the papers write it."""
    h = x.reshape(-1, x.shape[-1])
    scores = torch.sigmoid(h @ layer.router.weight.T)
    rows = []
    for t in range(h.shape[0]):
        y = torch.zeros(h.shape[1])
        for e in routing.expert_idx[routing.token_idx == t].tolist():
            y = y + scores[t, e] * swiglu(h[t], layer.experts.w13[e], layer.experts.w2[e])
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("total", ["not N k", "N k"])
def test_threshold_layer_output_is_the_sum_over_each_tokens_own_experts(total):
    """The layer equals the per-token definition whatever the number of
    assignments, including the case where it happens to equal N * top_k
    (thresholds set so that every expert takes exactly C = N k / E tokens)
    while tokens hold 0 to E experts each."""
    torch.manual_seed(0)
    layer = MoELayer(GPTConfig(vocab_size=64, seq_len=12, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                               top_k=2, d_expert=8, balancer="threshold")).eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        r = layer.router(x).reshape(-1, 4)
        C = 24 * 2 // 4
        ranked = r.sort(dim=0, descending=True).values
        cut = (ranked[C - 1] + ranked[C]) / 2 if total == "N k" else ranked[C - 2]
        layer.balancer.threshold.copy_(cut)
        layer.balancer.updates.fill_(1)
        y, _, routing = layer(x)
    per_token = torch.bincount(routing.token_idx, minlength=24)
    assert (per_token != 2).any()
    assert (routing.expert_idx.numel() == 48) == (total == "N k")
    torch.testing.assert_close(y, naive_layer(layer, x, routing))


# ----------------------------------------------------------------------------
# Several processes: the statistic is the global batch's, however it is cut.

E_2P, K_2P = 4, 2


def global_batches():
    """Two optimizer steps' global batches of 4 sequences x 6 tokens."""
    g = torch.Generator().manual_seed(11)
    return [torch.randn(4, 6, E_2P, generator=g) + torch.linspace(0, 1, E_2P) for _ in range(2)]


def statistics_after_two_steps(world_size, rank, micro_steps):
    """beta (quantile) and c (threshold) after two steps, this rank routing
    its share of every global batch in `micro_steps` micro-steps."""
    out = {}
    for name, field in (("quantile", "beta"), ("threshold", "threshold")):
        bal = make_balancer(name, E_2P, K_2P, {}, world_size).train()
        for batch in global_batches():
            mine = batch.chunk(world_size)[rank]
            for micro in mine.chunk(micro_steps):
                bal.route(micro)
            bal.step(torch.zeros(E_2P, dtype=torch.long))
        out[name] = getattr(bal, field).clone()
    return out


def two_rank_worker(rank, world_size):
    return statistics_after_two_steps(world_size, rank, micro_steps=2)


def test_quantile_and_threshold_two_ranks_equal_one_process_on_the_same_global_batch():
    """One process on the whole global batch, one process in two micro-steps,
    and 2 ranks x 2 micro-steps give the same beta and the same threshold to
    the last bit: the histograms' integer counts add exactly however the
    batch is cut up (balancers.all_reduce sums them over ranks)."""
    one = statistics_after_two_steps(1, 0, micro_steps=1)
    accum = statistics_after_two_steps(1, 0, micro_steps=2)
    ranks = run_distributed(two_rank_worker, 2)
    for name in ("quantile", "threshold"):
        assert one[name].abs().sum() > 0
        assert torch.equal(accum[name], one[name]), name
        for r in ranks:
            assert torch.equal(r[name], one[name]), name
