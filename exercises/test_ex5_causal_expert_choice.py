"""Checks for exercise 5, expert choice with thresholds from past batches:
exactly causal (train.causal_probe reads 0, where expert choice leaks),
expert choice's cut-off as the threshold, learnt only in training and only
in step(), from every micro-step and every rank (one launch of 2 processes),
and loads near the capacity C."""

import torch

from balancers import BALANCERS, expert_capacity, make_balancer
from checking import exercise, leak, tiny_gpt, train_a_little
from plumbing import spawn

EXERCISE = "ex5 causal expert choice (Zhou et al. 2022; Wang et al. 2024, Sec. 5.2)"
HINT = ("cutoffs: an expert keeps its C best tokens of a group, so which score is the first one it turns "
        "away? route: decide each (token, expert) pair alone; step: where do the other micro-steps' and "
        "the other ranks' cut-offs come in?")

ex = exercise("ex5_causal_expert_choice")
Causal = ex.CausalExpertChoice


def batch(B=2, T=32, E=4, seed=0, lean=1.0):
    """Router logits for B sequences, tilted towards the low experts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, E, generator=g) + torch.linspace(lean, -lean, E)


def pairs(routing):
    return sorted(zip(routing.token_idx.tolist(), routing.expert_idx.tolist()))


def learnt(*micro_batches, E=4, **knobs):
    """A fresh balancer after one optimizer step over these micro-batches."""
    bal = Causal(E, 1, dict(**knobs)).train()
    for logits in micro_batches:
        bal.route(logits)
    bal.step(torch.zeros(E, dtype=torch.long))
    return bal


def test_expert_takes_the_tokens_above_its_threshold_with_raw_score_as_weight():
    """Expert i takes token t iff s_{i,t} > theta_i; the weight is the raw
    score s_{i,t}, with gradient (as in expert choice)."""
    E = 4
    logits = batch(E=E).requires_grad_()
    bal = Causal(E, 1, {}).eval()
    bal.threshold.copy_(torch.tensor([0.3, 0.25, 0.2, 0.1]))
    routing = bal.route(logits)
    s = logits.softmax(-1).reshape(-1, E)
    want = (s > bal.threshold).nonzero().tolist()
    assert pairs(routing) == sorted(map(tuple, want)), "expert i must take exactly the tokens with s_i > threshold_i"
    assert torch.equal(routing.weight, s[routing.token_idx, routing.expert_idx]), "the weight must be the raw score s"
    assert routing.weight.requires_grad, "the weight must carry gradient to the router"


def test_threshold_is_expert_choice_cut_off_of_the_last_batch():
    """After one step on a batch of one routing group, that same batch would
    give every expert exactly expert choice's C tokens, the same ones expert
    choice picks: the threshold is the score of the first token expert choice
    turns away."""
    E, T, c = 4, 32, 2.0
    logits = batch(B=2, T=T, E=E)
    bal = learnt(logits, capacity_factor=c, route_seqs=2).eval()
    mine = bal.route(logits)
    ec = make_balancer("expert_choice", E, 1, dict(capacity_factor=c, route_seqs=2)).route(logits)
    C = expert_capacity(2 * T, c, E)
    got = torch.bincount(mine.expert_idx, minlength=E).tolist()
    assert got == [C] * E, \
        f"after a step on a batch, that batch must give every expert exactly expert choice's C = {C} tokens " \
        f"(got {got}): the threshold is the score of the first token expert choice turns away"
    assert pairs(mine) == pairs(ec), "on the batch it learnt from, the routing must be expert choice's"


def test_threshold_changes_only_in_step():
    """route() remembers a training batch for later but must not act on it:
    until step() is called, a batch is routed in training mode exactly as the
    thresholds learnt so far say (as in evaluation), whatever was routed
    before it in the same step."""
    E = 4
    bal = learnt(batch(seed=1), E=E)
    a, b = batch(seed=2), batch(seed=3, lean=-2.0)
    expected = pairs(bal.eval().route(a))
    bal.train()
    message = "in training mode a batch was routed with cut-offs of the current step: the threshold must come " \
              "only from batches already trained on (it may change in step() alone)"
    assert pairs(bal.route(a)) == expected, message
    bal.route(b)
    assert pairs(bal.route(a)) == expected, message


def test_model_is_exactly_causal():
    """Each (token, expert) pair is decided by the token's own score and a
    threshold from past batches: changing later tokens must not move earlier
    logits by a single bit, where expert choice's do move."""
    assert BALANCERS.get("ex5_causal_ec") is Causal, "the file must register BALANCERS['ex5_causal_ec']"
    model = train_a_little(tiny_gpt("ex5_causal_ec"))
    for layer in model.moe_layers():
        assert (layer.balancer.threshold < 1).all(), "training steps must set the thresholds (in step())"
    assert leak(model) == 0, "the logits at positions <= t changed when later tokens changed: the routing is not causal"
    assert leak(train_a_little(tiny_gpt("expert_choice"))) > 0      # the leak this exercise removes


def test_training_forward_is_causal_too():
    """The same in training mode, where route() also collects cut-offs."""
    model = train_a_little(tiny_gpt("ex5_causal_ec")).train()
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(4))
    x2 = x.clone()
    x2[:, 8:] = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(x).logits[:, :8], model(x2).logits[:, :8]
    assert torch.equal(a, b), \
        "in training mode the logits at positions < 8 changed when later tokens changed: a batch's own cut-offs " \
        "must only be used for the next batch"


def test_evaluation_does_not_move_thresholds():
    """A validation batch in the middle of a step must not count: the
    thresholds learnt are those of the training batches alone."""
    E = 4
    bal = Causal(E, 1, {}).train()
    bal.route(batch(seed=1))
    bal.eval()
    bal.route(batch(seed=6, lean=-3.0))
    bal.train()
    bal.step(torch.zeros(E, dtype=torch.long))
    torch.testing.assert_close(bal.threshold, learnt(batch(seed=1), E=E).threshold,
                               msg="a batch routed in evaluation mode changed the thresholds: "
                                   "collect in training mode only")


def test_micro_steps_give_the_thresholds_of_the_whole_batch():
    """A global batch of 4 sequences in one micro-step, or as two micro-steps
    of 2 (--grad-accum 2): the same routing groups, so the same thresholds --
    the mean over every group of the optimizer step, not the last micro-step's."""
    E = 4
    a, b = batch(seed=1), batch(seed=7, lean=-1.0)
    whole = learnt(torch.cat([a, b]), E=E).threshold
    split = learnt(a, b, E=E).threshold
    torch.testing.assert_close(split, whole, msg="the thresholds after two micro-steps must equal those of the "
                               "same batch in one: average the cut-offs of every routing group of the step")


def one_rank(rank, world_size, halves):
    """A rank of a 2-process run: one optimizer step on its half of the
    global batch. Runs in a process of its own (plumbing.spawn)."""
    E = halves[rank].shape[-1]
    bal = Causal(E, 1, {}, world_size=world_size).train()
    bal.route(halves[rank])
    bal.step(torch.zeros(E, dtype=torch.long))
    return bal.threshold


def test_thresholds_average_the_routing_groups_of_every_rank():
    """Two processes (gloo) each train on half of one global batch: both must
    end with the thresholds of one process that trained on the whole batch,
    the mean over every rank's routing groups. On one process the all-reduce
    in step() does nothing, so only a real second rank can tell whether it
    is there: without it, each rank would keep the cut-offs of its own half
    and the ranks would route differently from then on."""
    E = 4
    halves = [batch(seed=1), batch(seed=7, lean=-1.0)]
    whole = learnt(torch.cat(halves), E=E).threshold        # a stub stops here, before any process starts
    alone = learnt(halves[0], E=E).threshold
    assert not torch.allclose(alone, whole)                 # the halves differ, so the check can fail
    for rank, threshold in enumerate(spawn(one_rank, 2, halves, timeout=120)):
        torch.testing.assert_close(threshold, whole, msg=(
            f"rank {rank} of 2 ended with thresholds {[round(x, 3) for x in threshold.tolist()]}, not those of "
            f"the whole global batch {[round(x, 3) for x in whole.tolist()]}: step() must average the cut-offs "
            f"of every rank's routing groups"))


def test_scratch_is_back_to_zero_after_step():
    """Buffers that are not saved (persistent=False) hold nothing between
    optimizer steps, or a resumed run would differ (as in tests/test_balancers.py)."""
    bal = learnt(batch(seed=1))
    kept = bal.state()
    assert "threshold" in kept
    for name, buf in bal.named_buffers():
        if name not in kept:
            assert not buf.any(), f"scratch buffer {name} must be back to zero after step()"


def test_loads_stay_near_capacity_on_a_steady_router():
    """Fresh batches from one skewed router: from the second step on, every
    expert's load stays near its capacity c N / E, although a token may go to
    any number of experts (the price of causality: near, not exactly)."""
    E, c = 8, 2.0
    bal = Causal(E, 2, dict(capacity_factor=c)).train()
    g = torch.Generator().manual_seed(0)
    worst = []
    for step in range(12):
        logits = torch.randn(8, 64, E, generator=g) + torch.linspace(2.0, -2.0, E)
        load = torch.bincount(bal.route(logits).expert_idx, minlength=E).float()
        bal.step(load.long())
        if step:
            target = c * 8 * 64 / E
            worst.append(((load - target).abs().max() / target).item())
    assert max(worst) < 0.4 and sum(worst) / len(worst) < 0.25, \
        f"loads strayed from the capacity c N / E by up to {max(worst):.0%} " \
        f"(mean worst {sum(worst) / len(worst):.0%}): " \
        "the thresholds must track expert choice's cut-off"
