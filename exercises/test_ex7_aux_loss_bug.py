"""Checks for exercise 7, the aux loss with a shipped bug to find (Fedus et
al. 2021, Sec. 2.2; OLMoE #45, minimind #290). Each test names one property
of Switch's loss; the file is "not started" until its DIAGNOSIS is written
(checking.diagnosed)."""

import pytest
import torch

from balancers import BALANCERS, AuxLoss
from checking import diagnosed, exercise, skewed_logits, tiny_gpt

EXERCISE = "ex7 find the bug: aux loss (Fedus et al. 2021, Sec. 2.2)"
HINT = ("the loss is right at top-1 and off by a factor k at top-k: follow k through loss(). What does "
        "each f_i count, and out of how many? Switch's f sums to 1 over the experts.")

ex = exercise("ex7_aux_loss_bug")


def strategy():
    return diagnosed(ex, 7).SwitchAux


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_uniform_router_costs_exactly_alpha(top_k):
    """All logits equal: a router that cannot tell the experts apart, P_i =
    1/E for every expert, Switch's minimum. E * sum_i f_i / E = sum_i f_i,
    which is 1 only if f is a fraction of all the assignments."""
    loss = strategy()(8, top_k, {"alpha": 1.0})(torch.zeros(4, 16, 8))[1].item()
    assert loss == pytest.approx(1.0, abs=1e-6), \
        f"a uniform router must cost exactly alpha whatever k is (Switch's minimum): at top-{top_k} it costs " \
        f"{loss:.4g} x alpha"


@pytest.mark.parametrize("top_k", [1, 2])
def test_loss_is_switchs_formula_with_f_summing_to_one(top_k):
    """On a skewed router, the same number as the project's aux loss with one
    balance group per micro-batch: alpha * E * sum_i f_i P_i, where f_i is
    expert i's share of the k T assignments."""
    logits = skewed_logits(n_tokens=64).reshape(4, 16, 8)
    knobs = {"alpha": 1e-2}
    got = strategy()(8, top_k, knobs)(logits)[1].item()
    want = AuxLoss(8, top_k, dict(knobs, balance_seqs=4))(logits)[1].item()
    assert got == pytest.approx(want, rel=1e-5), \
        f"top-{top_k}: the loss must be alpha * E * sum_i f_i P_i with f each expert's share of the k T " \
        f"assignments, so that f sums to 1 (got {got:.6g}, Switch's formula gives {want:.6g})"


def test_loss_pushes_the_busiest_expert_down():
    """The gradient reaches the router through P: gradient descent must lower
    the logit of the expert that gets the most tokens and raise the idlest's."""
    logits = skewed_logits(n_tokens=64).reshape(4, 16, 8).requires_grad_(True)
    loss = strategy()(8, 2, {"alpha": 1e-2})(logits)[1]
    assert loss.requires_grad, "the loss must push the busiest expert down: it has no gradient at all " \
                               "(P must carry it)"
    grad = torch.autograd.grad(loss, logits)[0].sum((0, 1))
    assert grad[0] > 0 > grad[-1], \
        f"the loss must push the busiest expert (0) down and the idlest ({len(grad) - 1}) up " \
        f"(gradient by expert: {grad.tolist()})"


def test_a_fresh_model_logs_about_alpha_per_layer():
    """In the model: GPT.forward adds every layer's loss. A freshly
    initialised router is nearly uniform, so each layer costs about alpha,
    at any k (here top-2)."""
    assert BALANCERS.get("ex7_aux") is strategy(), "the file must register BALANCERS['ex7_aux']"
    model = tiny_gpt("ex7_aux", alpha=1e-2)
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    per_layer = model(x).balance_loss.item() / len(model.moe_layers())
    assert per_layer == pytest.approx(1e-2, rel=0.05), \
        f"a freshly initialised model (its router nearly uniform) must log a balance loss of about alpha per " \
        f"layer: got {per_layer / 1e-2:.3g} x alpha at top-2"
