"""runtime/spec_policy.py: the draft length follows the measured costs and acceptance."""

from __future__ import annotations

import pytest

from mlctrio.runtime.spec_policy import DraftPolicy, expected_tokens


def _measured(policy: DraftPolicy, b: int, t: int, seconds: float) -> None:
    """A size measured (its first, one-off call is not counted)."""
    policy.observe_step(b, t, seconds * 10)
    policy.observe_step(b, t, seconds)


def test_expected_tokens() -> None:
    assert expected_tokens(0.5, 0) == 1
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5


def test_a_batch_size_never_measured_decodes_plainly_first() -> None:
    policy = DraftPolicy(alpha_prior=0.99)
    assert policy.choose(["a"], [8], 1) == 0
    _measured(policy, 1, 1, 0.020)
    assert policy.choose(["a"], [8], 1) > 0  # the prior: +15% per drafted token pays at 0.99


def test_drafting_stops_where_verification_costs_more_than_it_yields() -> None:
    policy = DraftPolicy(alpha_prior=0.9, max_length=8)
    _measured(policy, 1, 1, 0.005)  # a plain step: 5 ms
    for t in range(2, 10):  # narrow verification is slow here: 18 ms and up
        _measured(policy, 1, t, 0.018 + 0.001 * t)
    policy.observe_draft("a", 8, 0)  # and this choice's drafts fail at once
    policy.observe_draft("a", 8, 0)
    assert policy.choose(["a"], [8], 1, explore=False) == 0
    # a choice whose drafts hold pays for the longest draft
    for _ in range(4):
        policy.observe_draft("b", 8, 8)
    assert policy.choose(["b"], [8], 1) == 8


def test_costs_are_interpolated_and_extrapolated_from_measured_sizes() -> None:
    policy = DraftPolicy()
    _measured(policy, 2, 2, 0.010)
    assert policy.cost(2, 6) == pytest.approx(0.010 * (1 + 0.15 * 4))  # the prior
    _measured(policy, 2, 6, 0.030)
    assert policy.cost(2, 4) == pytest.approx(0.020)  # between plain and the measured size
    assert policy.cost(2, 8) == pytest.approx(0.030 + 0.5 * 0.005 * 2)  # optimistic beyond
    _measured(policy, 2, 10, 0.034)
    assert policy.cost(2, 12) == pytest.approx(0.034 + 0.001 * 2)  # the last two sizes' slope


def test_without_drafts_a_stale_estimate_is_tried_again() -> None:
    policy = DraftPolicy(alpha_prior=0.1, explore_every=4)
    _measured(policy, 1, 1, 0.010)
    choices = [policy.choose(["a"], [4], 1) for _ in range(8)]
    assert choices.count(1) == 2 and choices.count(0) == 6
    assert all(policy.choose(["a"], [4], 1, explore=False) == 0 for _ in range(8))


def test_a_first_call_is_not_counted_and_stale_sizes_are_forgotten() -> None:
    policy = DraftPolicy()
    policy.observe_step(1, 1, 1.0)  # a first call: one-off costs
    assert policy.choose(["a"], [4], 1) == 0  # still unmeasured
    policy.observe_step(1, 1, 0.010)
    policy.observe_step(1, 5, 9.0)
    policy.observe_step(1, 5, 0.5)  # one bad measurement of a drafted size
    assert policy.cost(1, 5) == pytest.approx(0.5)
    for _ in range(300):  # plain steps only: the drafted size is not refreshed
        policy.observe_step(1, 1, 0.010)
    assert policy.cost(1, 5) == pytest.approx(0.010 * (1 + 0.15 * 4))  # back to the prior
