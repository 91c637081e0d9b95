"""Checks for exercise 6, the measurement of which domain first owns an
expert (Qiu et al. 2025, Fig. 1b): the ownership rule on hand-made expert
frequencies, and the "for good" rule on a hand-made training history. The
training itself is train.py's; run it with
`python -m exercises.ex6_first_specialist`."""

import math

import torch

from checking import exercise

EXERCISE = "ex6 which domain owns an expert first (Qiu et al. 2025, Fig. 1b)"
HINT = ("ownership compares the domains with each other for one expert: which dimension is that? An unused "
        "expert must not give 0 / 0; a barely used one is no specialist; \"from which step on\" is easiest "
        "read from the end of the history")

ex = exercise("ex6_first_specialist")
DOMAINS = ["code", "math", "prose"]


def even(L=2, D=3, E=4, k=2):
    """Every domain spreads its k assignments per token evenly: freq = k / E."""
    return torch.full((L, D, E), k / E, dtype=torch.float64)


def give(freq, domain, layer, expert, others=0.05):
    """Make expert (layer, expert) domain `domain`'s: the other domains send
    it only `others` of their tokens."""
    d = DOMAINS.index(domain)
    for o in range(freq.shape[1]):
        if o != d:
            freq[layer, o, expert] = others
    return freq


def test_share_splits_each_experts_use_between_the_domains():
    """share[l, d, e] = freq[l, d, e] / sum over domains: it sums to 1 over
    domains for every expert, in proportion to the frequencies."""
    freq = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    share = ex.ownership(freq)
    torch.testing.assert_close(share.sum(1), torch.ones(2, 4, dtype=torch.float64),
                               msg="every used expert's shares must add up to 1 over the domains (dim 1)")
    torch.testing.assert_close(share[:, 0] / share[:, 1], freq[:, 0] / freq[:, 1],
                               msg="the shares must be in proportion to the domains' frequencies")


def test_an_expert_only_one_domain_uses_is_its_own_even_if_that_domain_spreads_out():
    """Ownership compares domains, not experts: domain `code` spreads its
    tokens evenly over all 4 experts, but it alone uses expert 3, so expert 3
    is code's, however small a part of code's tokens it gets."""
    freq = even(L=1)
    freq[0, 1] = torch.tensor([0.9, 0.9, 0.2, 0.0], dtype=torch.float64)
    freq[0, 2] = torch.tensor([0.9, 0.9, 0.2, 0.0], dtype=torch.float64)
    assert ex.ownership(freq)[0, 0, 3] == 1, "an expert used by one domain alone must have share 1 for that domain " \
        "(share across domains, not across experts)"
    assert ex.owned(freq)[0, 0, 3], \
        "expert 3 is used by code alone: it must be code's own (share across domains, not across experts)"


def test_an_expert_every_domain_uses_belongs_to_none():
    """Evenly shared (share 1/3 each), or heavily used by every domain: no
    owner. Popular is not specialised."""
    freq = even()
    freq[:, :, 0] = 0.9
    assert not ex.owned(freq).any(), "an expert every domain uses as much as the others must belong to no domain"


def test_an_unused_expert_belongs_to_nobody_and_gives_no_nan():
    freq = even()
    freq[1, :, 2] = 0.0
    share = ex.ownership(freq)
    assert not share.isnan().any(), "an expert nobody uses must get share 0, not NaN (0 / 0)"
    assert (share[1, :, 2] == 0).all() and not ex.owned(freq)[1, :, 2].any(), "an unused expert belongs to nobody"


def test_a_barely_used_expert_is_no_specialist():
    """A dying expert that only `math` still sends 1% of its tokens to has
    share 1, but is no specialist: below min_use of math's fair share."""
    freq = even(L=1)
    freq[0, :, 3] = 0.0
    freq[0, 1, 3] = 0.01
    assert not ex.owned(freq)[0, 1, 3], \
        "an expert that gets 1% of math's tokens (a fair share would be 38%) must not count as math's own, " \
        "whatever its share: apply min_use"
    assert ex.owned(freq, min_use=0.01)[0, 1, 3], "with min_use = 0.01 the same expert must count as math's own"


def test_threshold_is_a_share_of_the_experts_use():
    freq = give(even(L=1), "math", 0, 1, others=0.1)              # math's share: 0.5 / 0.7 = 0.71
    assert ex.owned(freq, threshold=0.6)[0, 1, 1] and not ex.owned(freq, threshold=0.8)[0, 1, 1], \
        "a share of 71% must count at threshold 0.6 and not at 0.8"


def history():
    """A hand-made training history of 5 evaluations."""
    steps = []
    for step in (10, 20, 30, 40, 50):
        freq = even()
        if step in (20, 40, 50):                       # math: owns, loses, then keeps from 40 on
            give(freq, "math", 1, 2)
        if step == 40:                                 # ... with a second, stronger expert at 40
            give(freq, "math", 0, 3, others=0.01)
        if step == 50:                                 # code: owns at the last evaluation only
            give(freq, "code", 0, 0)
        if step < 50:                                  # prose: owns from the start but not at the end
            give(freq, "prose", 1, 1)
        steps.append((step, freq))
    return steps


def test_first_owned_is_the_step_from_which_the_domain_keeps_an_expert():
    """Ownership that is lost again does not count: the answer is the step
    from which the domain owns an expert at every later evaluation."""
    first = ex.first_owned(history(), DOMAINS)
    assert set(first) == set(DOMAINS)
    assert first["prose"] is None, "prose owns no expert at the last evaluation: its answer must be None"
    assert first["math"] is not None and first["math"][0] == 40, \
        f"math owns an expert at step 20, loses it at 30 and keeps one from 40 on: the answer is step 40, " \
        f"not {first['math'] and first['math'][0]} (ownership must last to the end)"
    assert first["code"] is not None and first["code"][0] == 50, "code owns an expert at the last step only: step 50"


def test_first_owned_reports_the_expert_with_the_largest_share():
    first = ex.first_owned(history(), DOMAINS)
    assert first["math"] is not None, "math owns an expert from step 40 to the end: its answer must not be None"
    step, layer, expert, share = first["math"]
    assert (layer, expert) == (0, 3), \
        f"at step 40 math owns layer 1 expert 2 (83%) and layer 0 expert 3 (96%): report the larger share, " \
        f"not {(layer, expert)}"
    assert math.isclose(share, 0.5 / 0.52), f"the share reported must be that expert's share ({share})"
    assert first["code"][1:3] == (0, 0)
