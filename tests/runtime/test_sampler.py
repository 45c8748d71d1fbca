"""Tests for runtime/sampler.py: reproducibility, greedy, truncation, bias, penalties, logprobs.

Statistical tests use fixed seeds, so they are deterministic: a threshold that passes once passes
always, and each is chosen far from both the correct and a wrong distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mlctrio.engine.types import SamplingParams
from mlctrio.runtime.sampler import (
    SampleOutput,
    Sampler,
    apply_penalties,
    ban_tokens,
    make_generator,
    penalize_row,
)

VOCAB_SIZE = 1037  # not a multiple of the sampler's block: exercises the padding


def softmax64(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    z = np.asarray(x, dtype=np.float64)
    e = np.exp(z - z.max())
    result: npt.NDArray[np.float64] = e / e.sum()
    return result


def log_softmax64(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    z = np.asarray(x, dtype=np.float64)
    shifted = z - z.max()
    result: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum())
    return result


def sample_rows(
    sampler: Sampler,
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    outputs: Sequence[Sequence[int]] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
) -> SampleOutput:
    n = len(params)
    return sampler.sample(
        logits.astype(np.float32, copy=True),
        params,
        [make_generator(s, 0) for s in seeds],
        outputs if outputs is not None else [[]] * n,
        prompts if prompts is not None else [[]] * n,
    )


def draws(
    logits_row: npt.ArrayLike, params: SamplingParams, num_draws: int, seed: int = 0
) -> npt.NDArray[np.int64]:
    """num_draws independent samples of one row, batched as num_draws identical rows."""
    row = np.asarray(logits_row, dtype=np.float32)
    sampler = Sampler(row.shape[0])
    batch = np.tile(row, (num_draws, 1))
    seeds = [seed * 100_000 + i for i in range(num_draws)]
    return sample_rows(sampler, batch, [params] * num_draws, seeds).token_ids


# --- generators ------------------------------------------------------------------------------


def test_make_generator_streams_are_reproducible_and_distinct_per_branch() -> None:
    a = make_generator(42, 0).random(4)
    assert np.array_equal(a, make_generator(42, 0).random(4))
    assert not np.array_equal(a, make_generator(42, 1).random(4))
    assert not np.array_equal(a, make_generator(43, 0).random(4))
    assert make_generator(-7, 0).random() != make_generator(7, 0).random()


# --- seeded reproducibility under batching ------------------------------------------------------

FAKE_MODEL = np.random.default_rng(1234).standard_normal((97, VOCAB_SIZE)).astype(np.float32)
FAKE_MODEL *= np.linspace(0.5, 4.0, 97, dtype=np.float32)[:, None]  # peaked and flat states


def fake_logits(history: Sequence[int]) -> np.ndarray:
    """A deterministic 'model': the next-token logits depend only on the sequence so far."""
    logits: np.ndarray = FAKE_MODEL[(history[-1] * 31 + len(history)) % 97]
    return logits


@attrs.frozen
class Req:
    params: SamplingParams
    seed: int
    prompt: tuple[int, ...]


REQUESTS = (
    Req(SamplingParams(temperature=0.8, top_p=0.9), 1, (1, 2, 3)),
    Req(
        SamplingParams(temperature=1.0, top_k=20, presence_penalty=0.5, frequency_penalty=0.2),
        2,
        (5,),
    ),
    Req(SamplingParams(temperature=0.0, repetition_penalty=1.3), 3, (7, 8)),
    Req(
        SamplingParams(
            temperature=1.2, min_p=0.05, logit_bias={5: 3.0}, logprobs=True, top_logprobs=3
        ),
        4,
        (9, 9, 9),
    ),
    Req(SamplingParams(temperature=0.7), 5, (11,)),
    Req(
        SamplingParams(temperature=1.0, top_k=10, top_p=0.8, min_p=0.02, repetition_penalty=1.1),
        6,
        (2,),
    ),
)


def generate(requests: Sequence[Req], num_steps: int) -> list[list[int]]:
    """Decode all requests together for num_steps steps, one batch per step."""
    sampler = Sampler(VOCAB_SIZE)
    generators = [make_generator(r.seed, 0) for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    for _ in range(num_steps):
        logits = np.stack(
            [fake_logits(r.prompt + tuple(out)) for r, out in zip(requests, outputs, strict=True)]
        )
        result = sampler.sample(
            logits,
            [r.params for r in requests],
            generators,
            [list(out) for out in outputs],
            [r.prompt for r in requests],
        )
        for out, token in zip(outputs, result.token_ids, strict=True):
            out.append(int(token))
    return outputs


def test_seeded_stream_does_not_depend_on_batch_neighbours() -> None:
    num_steps = 25
    alone = [generate([r], num_steps)[0] for r in REQUESTS]
    together = generate(REQUESTS, num_steps)
    reversed_order = generate(REQUESTS[::-1], num_steps)[::-1]
    # Different neighbours and positions: each request next to copies of another one.
    pairs = [
        generate([REQUESTS[(i + 1) % len(REQUESTS)], r, r], num_steps)[1]
        for i, r in enumerate(REQUESTS)
    ]
    assert together == alone
    assert reversed_order == alone
    assert pairs == alone
    # Not vacuous: sampled streams vary, and another seed gives another stream.
    assert all(len(set(s)) > 3 for s in alone)
    reseeded = generate([attrs.evolve(REQUESTS[0], seed=99)], num_steps)[0]
    assert reseeded != alone[0]


def test_each_sampled_token_consumes_exactly_one_draw_and_greedy_none() -> None:
    sampler = Sampler(VOCAB_SIZE)
    logits = np.stack([FAKE_MODEL[0], FAKE_MODEL[1]])
    params = [SamplingParams(temperature=0.9, top_p=0.5), SamplingParams(temperature=0.0)]
    generators = [make_generator(1, 0), make_generator(2, 0)]
    for _ in range(3):
        sampler.sample(logits.copy(), params, generators, [[], []], [[], []])
    expected = make_generator(1, 0)
    expected.random(3)
    assert generators[0].bit_generator.state == expected.bit_generator.state
    assert generators[1].bit_generator.state == make_generator(2, 0).bit_generator.state


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_ties_to_lowest_id_and_no_logprobs() -> None:
    logits = np.random.default_rng(0).standard_normal((4, VOCAB_SIZE)).astype(np.float32)
    logits[1, [10, 500, 900]] = 50.0  # three-way tie
    out = sample_rows(Sampler(VOCAB_SIZE), logits, [SamplingParams(temperature=0.0)] * 4, range(4))
    assert out.token_ids.tolist() == [int(np.argmax(r)) for r in logits]
    assert out.token_ids[1] == 10
    assert out.token_ids.dtype == np.int64
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_padded_logits_beyond_vocab_are_never_chosen() -> None:
    logits = np.zeros((3, VOCAB_SIZE + 40), dtype=np.float32)
    logits[:, VOCAB_SIZE:] = 1e4  # a model's padded vocabulary holds garbage
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_p=0.5)]
    out = sample_rows(Sampler(VOCAB_SIZE), logits, params, range(3))
    assert (out.token_ids < VOCAB_SIZE).all()


# --- truncation --------------------------------------------------------------------------------


def reference_allowed(logits: np.ndarray, p: SamplingParams) -> set[int]:
    """Tokens top_k, top_p and min_p may keep, in float64, with a little slack for float32."""
    probs = softmax64(np.asarray(logits, dtype=np.float64) / p.temperature)
    keep = np.ones(probs.size, dtype=bool)
    if 0 < p.top_k < probs.size:
        # A token survives when fewer than k tokens are clearly more likely (ties all survive).
        keep &= np.array([(probs > q * (1 + 1e-4)).sum() < p.top_k for q in probs])
    if p.top_p < 1.0:
        kept = np.where(keep, probs, 0.0)
        total = kept.sum()
        keep &= np.array(
            [kept[kept > q * (1 + 1e-4)].sum() < p.top_p * total + 1e-4 for q in probs]
        )
    keep &= probs >= p.min_p * probs.max() * (1 - 1e-4)
    return set(np.flatnonzero(keep).tolist())


@settings(max_examples=60, deadline=None, database=None)
@given(
    logits=arrays(
        np.float32,
        st.integers(2, 64),
        elements=st.floats(-15, 15, width=32),
    ),
    top_k=st.integers(-1, 70),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 1.0),
    temperature=st.floats(0.2, 3.0),
)
def test_truncation_never_samples_outside_the_allowed_set(
    logits: np.ndarray, top_k: int, top_p: float, min_p: float, temperature: float
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampled = set(draws(logits, params, 200).tolist())
    allowed = reference_allowed(logits, params)
    assert sampled, "nothing sampled"
    assert sampled <= allowed


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.5), {0, 1, 2}),  # 0.2 + 0.2 + 0.2 reaches 0.5
        (SamplingParams(min_p=0.9), {0, 1, 2}),
        (SamplingParams(top_p=1e-6), {0}),  # keeps at least one token: the most likely
        (SamplingParams(min_p=1.0), {0}),
        (SamplingParams(top_k=4, top_p=0.6), {0, 1, 2}),  # top_p renormalised over the top 4
    ],
)
def test_truncation_keeps_exactly_the_expected_tokens(
    params: SamplingParams, expected: set[int]
) -> None:
    # Probabilities 0.2 + tiny, 0.2, 0.2, 0.1, then 30 tokens sharing the remaining 0.3.
    probs = np.array([0.2001, 0.2, 0.2, 0.1] + [0.3 / 30] * 30)
    sampled = set(draws(np.log(probs), params, 600).tolist())
    assert sampled == expected  # every allowed token shows up in 600 draws, nothing else


# --- temperature -------------------------------------------------------------------------------

TEMPERATURE_LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_sampled_distribution(temperature: float) -> None:
    num_draws = 6000
    tokens = draws(TEMPERATURE_LOGITS, SamplingParams(temperature=temperature), num_draws, seed=7)
    counts = np.bincount(tokens, minlength=TEMPERATURE_LOGITS.size)
    right = chi_square(counts, softmax64(TEMPERATURE_LOGITS / temperature))
    # 5 degrees of freedom: P(chi2 > 25) ~ 1e-4. The other temperatures are far off.
    assert right < 25
    for other in {0.5, 1.0, 2.0} - {temperature}:
        assert chi_square(counts, softmax64(TEMPERATURE_LOGITS / other)) > 200


# --- logit bias --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_plus_100_forces_and_minus_100_bans(temperature: float) -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(VOCAB_SIZE) * 3).astype(np.float32)
    top = int(np.argmax(logits))
    forced = int(np.argmin(logits))
    force = SamplingParams(temperature=temperature, logit_bias={forced: 100.0})
    assert set(draws(logits, force, 200).tolist()) == {forced}

    logits[top] += 5.0  # make the banned token overwhelmingly likely without the bias
    ban = SamplingParams(temperature=temperature, logit_bias={top: -100.0})
    sampled = draws(logits, ban, 300)
    assert top not in sampled.tolist()
    if temperature == 0.0:
        assert set(sampled.tolist()) == {int(np.argsort(logits)[-2])}


# --- penalties ---------------------------------------------------------------------------------


def reference_penalties(
    logits: np.ndarray, p: SamplingParams, output: Sequence[int], prompt: Sequence[int]
) -> np.ndarray:
    """The formulas, token by token in float64: bias, then HF repetition, then OpenAI penalties."""
    out = np.asarray(logits, dtype=np.float64).copy()
    for token, bias in p.logit_bias.items():
        out[token] += bias
    for token in set(prompt) | set(output):
        out[token] = (
            out[token] / p.repetition_penalty
            if out[token] > 0
            else out[token] * p.repetition_penalty
        )
    for token in set(output):
        count = list(output).count(token)
        out[token] -= p.presence_penalty * (count > 0) + p.frequency_penalty * count
    return out


def test_penalties_match_the_formulas_exactly() -> None:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 50)) * 4).astype(np.float32)
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=1.5, logit_bias={4: 2.5, 49: -1.0}),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.25),
    ]
    outputs = [[3, 3, 3, 7, 9, 3], [1, 2, 2, 4], [0, 0, 11, 12, 12, 12]]
    prompts = [[3, 20, 21], [2, 30, 30, 31], [11, 40, 41, 41]]
    adjusted = logits.copy()
    apply_penalties(adjusted, params, outputs, prompts)
    for i in range(3):
        expected = reference_penalties(logits[i], params[i], outputs[i], prompts[i])
        np.testing.assert_allclose(adjusted[i], expected, rtol=1e-6, atol=1e-6)
    # Untouched tokens keep their exact logits.
    assert adjusted[0, 40] == logits[0, 40]
    # Spot-check numbers by hand: row 0, token 3 appears 4 times in the output (not repetition).
    assert adjusted[0, 3] == pytest.approx(logits[0, 3] - 0.7 - 0.3 * 4, abs=1e-5)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    row = np.array([2.0, -2.0, 3.0, -3.0], dtype=np.float32)
    penalize_row(row, SamplingParams(repetition_penalty=2.0), [0, 1, 0], [1])
    assert row.tolist() == [1.0, -4.0, 3.0, -3.0]


def test_penalties_change_what_is_sampled() -> None:
    logits = np.zeros((1, 8), dtype=np.float32)
    logits[0, 2] = 1.0
    out = Sampler(8).sample(
        logits,
        [SamplingParams(temperature=0.0, frequency_penalty=2.0)],
        [make_generator(0, 0)],
        [[2]],
        [[]],
    )
    assert out.token_ids[0] == 0  # token 2 fell to -1.0, so the lowest id among the zeros wins


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_adjusted_logits_before_temperature() -> None:
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((4, VOCAB_SIZE)) * 2).astype(np.float32)
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=True, top_logprobs=5),
        SamplingParams(
            temperature=0.0,
            presence_penalty=1.0,
            logit_bias={7: 12.0},
            logprobs=True,
            top_logprobs=2,
        ),
        SamplingParams(temperature=1.0),  # asked for none
        SamplingParams(temperature=1.3, top_p=0.7, logprobs=True),
    ]
    outputs = [[], [1, 2, 2], [], []]
    prompts = [[], [5], [], []]
    out = sample_rows(Sampler(VOCAB_SIZE), logits, params, range(4), outputs, prompts)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    for i in (0, 1, 3):
        reference = log_softmax64(reference_penalties(logits[i], params[i], outputs[i], prompts[i]))
        token = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(reference[token], abs=1e-4)
        order = np.argsort(-reference, kind="stable")[:5]
        assert out.top_ids[i].tolist() == order.tolist()
        np.testing.assert_allclose(out.top_logprobs[i], reference[order], atol=1e-4)
        assert (np.diff(out.top_logprobs[i]) <= 0).all()
        assert out.logprobs[i] <= out.top_logprobs[i, 0] + 1e-6
    assert out.top_ids[1, 0] == 7  # the bias shows in the reported distribution
    assert np.isnan(out.logprobs[2]) and (out.top_ids[2] == -1).all()


def test_top_logprobs_list_tied_tokens_by_lower_id() -> None:
    logits = np.zeros((1, 300), dtype=np.float32)
    logits[0, [250, 40, 120]] = 3.0
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=4)]
    out = sample_rows(Sampler(300), logits, params, [0])
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids[0].tolist() == [40, 120, 250, 0]
    assert out.token_ids[0] == 40


def test_token_logprob_builds_the_engine_value() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)]
    out = sample_rows(Sampler(3), logits, params, [0])
    pieces = {0: b"a", 1: "é".encode()[:1], 2: b"c"}  # token 1 is half of a UTF-8 character
    value = out.token_logprob(0, 2, pieces.__getitem__)
    assert (value.token_id, value.token, value.bytes) == (0, "a", (97,))
    assert value.logprob == pytest.approx(np.log(0.5), abs=1e-6)
    assert [(t.token_id, t.token, t.bytes) for t in value.top_logprobs] == [
        (0, "a", (97,)),
        (1, "\ufffd", (0xC3,)),
    ]
    assert value.top_logprobs[1].logprob == pytest.approx(np.log(0.3), abs=1e-6)


def test_ban_tokens_sets_banned_logits_to_minus_inf_except_where_nothing_would_be_left() -> None:
    logits = np.zeros((3, 8), np.float32)
    logits[1, :] = -np.inf
    logits[1, 2] = 5.0  # a grammar that allows only token 2 (EOS)
    ban_tokens(logits, [np.array([2, 5, 99]), np.array([2]), None])
    assert np.isneginf(logits[0, [2, 5]]).all() and np.isfinite(np.delete(logits[0], [2, 5])).all()
    assert logits[1, 2] == 5.0  # kept: banning it would leave no token at all
    assert (logits[2] == 0).all()
    out = Sampler(8).sample(
        logits[:1], [SamplingParams(temperature=1.0)], [make_generator(0, 0)], [[]], [[]]
    )
    assert int(out.token_ids[0]) not in (2, 5)
