"""Checks for exercise 4, global-batch balancing without Algorithm 1's buffer
(Qiu et al. 2025): f over every rank, nothing carried between micro-steps,
and -- the point of the exercise -- what that does under gradient
accumulation, side by side with balancers.GlobalAuxLoss."""

import pytest
import torch

from balancers import BALANCERS, make_balancer
from checking import exercise

EXERCISE = "ex4 global batch without the buffer (Qiu et al. 2025, Alg. 1)"
HINT = ("read balancers.GlobalAuxLoss.loss and find the lines that are the buffer; an all-reduce changes "
        "its tensor in place (is the tensor you reduce the one you use?); what must f sum to over experts?")

ex = exercise("ex4_global_no_buffer")
NoBuffer = ex.GlobalAuxNoBuffer


def logits_leaning(towards, B=2, T=8, E=4, seed=0):
    """A micro-batch whose tokens prefer the experts in `towards`."""
    lean = torch.full((E,), -1.5)
    lean[list(towards)] = 1.5
    return torch.randn(B, T, E, generator=torch.Generator().manual_seed(seed)) + lean


def reference(routing, counts, alpha, E):
    """Eq. 5 by hand: alpha * N_E * sum_i f_i P_i, f from `counts` (held
    constant), P the mean of this rank's probabilities."""
    f = counts.double() / counts.sum()
    return alpha * E * (f * routing.probs.double().reshape(-1, E).mean(0)).sum()


@pytest.mark.parametrize("E,k", [(4, 1), (8, 2)])
def test_uniform_router_costs_exactly_alpha(E, k):
    """f sums to 1 (it counts k assignments per token), so a router that
    scores every expert equally (P_i = 1/E) costs exactly alpha."""
    bal = NoBuffer(E, k, dict(alpha=0.25)).train()
    loss = bal.loss(bal.route(torch.zeros(2, 6, E)))
    assert abs(loss.item() - 0.25) < 1e-6, \
        f"a uniform router must cost exactly alpha = 0.25 (got {loss.item():.4g}): f_i must be expert i's share " \
        "of the k*T assignments, so that f sums to 1"


def test_f_counts_every_rank(monkeypatch):
    """With 2 ranks, f must include the other rank's counts (one all-reduce
    of N_E integers), while P stays this rank's own. The other rank is faked:
    its all-reduce adds fixed counts."""
    E, k, alpha = 4, 2, 0.5
    other = torch.tensor([0, 0, 10, 22])              # the other rank sent its tokens to experts 2 and 3

    def fake_all_reduce(t, op=None, **kwargs):
        assert not t.is_floating_point() and t.shape == (E,), \
            "all-reduce the per-expert counts (N_E exact integers), not probabilities or fractions"
        t += other

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    logits = logits_leaning([0, 1]).requires_grad_()
    bal = NoBuffer(E, k, dict(alpha=alpha), world_size=2).train()
    routing = bal.route(logits)
    loss = bal.loss(routing)
    mine = torch.bincount(routing.expert_idx, minlength=E)
    want = reference(routing, mine + other, alpha, E)
    assert abs(loss.item() - want.item()) < 1e-6, \
        f"f must count the selections of every rank (all-reduced counts): loss {loss.item():.6f}, Eq. 5 gives " \
        f"{want.item():.6f} (with this rank's counts alone: {reference(routing, mine, alpha, E).item():.6f})"
    loss.backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = reference(bal.route(ref_logits), mine + other, alpha, E)
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad.float(), rtol=1e-5, atol=1e-8,
                               msg="only P may carry gradient (f is a count)")


def test_a_micro_step_forgets_the_earlier_ones():
    """No buffer: the loss of micro-step 2 is the loss of micro-batch 2 alone,
    whatever micro-step 1 routed."""
    E, k = 4, 2
    first, second = logits_leaning([0, 1], seed=1), logits_leaning([2, 3], seed=2)
    bal = NoBuffer(E, k, {}).train()
    bal.loss(bal.route(first))
    after = bal.loss(bal.route(second))
    fresh = NoBuffer(E, k, {}).train()
    alone = fresh.loss(fresh.route(second))
    assert after.item() == alone.item(), \
        f"micro-step 2's loss ({after.item():.6f}) must not depend on micro-step 1 (alone: {alone.item():.6f}): " \
        "without the buffer nothing is carried between micro-steps"


def test_with_one_micro_step_it_is_global_aux():
    """With --grad-accum 1 the global batch is one micro-step per rank: the
    buffer holds nothing else, and both give the same loss and gradient."""
    E, k = 4, 2
    logits = logits_leaning([0], seed=3)
    grads, losses = [], []
    for bal in (NoBuffer(E, k, {}), make_balancer("global_aux", E, k, {})):
        x = logits.clone().requires_grad_()
        loss = bal.train().loss(bal.route(x))
        loss.backward()
        losses.append(loss.item())
        grads.append(x.grad)
    assert abs(losses[0] - losses[1]) < 1e-7, \
        f"one micro-step: the loss must equal global_aux's ({losses[0]} vs {losses[1]})"
    torch.testing.assert_close(grads[0], grads[1], msg="one micro-step: the gradient must equal global_aux's")


def test_under_gradient_accumulation_it_balances_each_micro_batch():
    """The difference the buffer makes. One global batch, two micro-steps:
    micro-batch 1 prefers experts 0-1, micro-batch 2 experts 2-3 (say code,
    then math), so the global batch as a whole is balanced.

    - global_aux (Algorithm 1) at micro-step 2 counts both: f is balanced.
    - without the buffer, micro-step 2 counts only itself: its f is as skewed
      as the micro-batch, exactly what aux computes with the micro-batch as
      its balance group -- micro-batch balancing, which pushes every
      micro-batch to spread over all experts and blocks specialisation."""
    E, k = 4, 2
    first, second = logits_leaning([0, 1], seed=1), logits_leaning([2, 3], seed=2)
    nobuf = NoBuffer(E, k, {}).train()
    buffered = make_balancer("global_aux", E, k, {}).train()
    for bal in (nobuf, buffered):
        bal.loss(bal.route(first))
    without = nobuf.loss(nobuf.route(second))
    with_buffer = buffered.loss(buffered.route(second))
    micro_aux = make_balancer("aux", E, k, dict(balance_seqs=second.shape[0]))
    as_micro = micro_aux.loss(micro_aux.route(second))
    assert abs(without.item() - as_micro.item()) < 1e-7, \
        "under gradient accumulation, balancing without the buffer must equal aux with the micro-batch as " \
        f"balance group ({without.item():.6f} vs {as_micro.item():.6f})"
    assert without > 1.2 * with_buffer, \
        "micro-step 2 leans the other way from micro-step 1: without the buffer it must be penalised more " \
        f"than with it ({without.item():.5f} vs {with_buffer.item():.5f})"
    assert not NoBuffer.accum_invariant and BALANCERS.get("ex4_global_aux_nobuf") is NoBuffer
