"""Batch sampler: one step's logits (B, V) in, one token per row out, vectorised with numpy.

Per row, in the order vLLM and HF use:

1. Logit adjustments (`apply_penalties`): logit_bias is added, then the HF repetition penalty over
   prompt + output tokens (logit > 0 → / p, else * p), then OpenAI presence/frequency penalties over
   output tokens (logit -= presence * (count > 0) + frequency * count).
2. Logprobs are taken HERE: log_softmax of the adjusted logits, before temperature and truncation.
   That is what OpenAI reports (the model's distribution, not the sampling distribution), so a
   logprob does not change when a client changes temperature, top_p, top_k or min_p.
3. temperature <= 1e-5 (vLLM's epsilon) is greedy: argmax, ties to the lowest id, no randomness.
4. Otherwise: logits / temperature, then top_k, then top_p over the top_k-renormalised
   distribution, then min_p (prob >= min_p * max prob), then inverse-CDF sampling with exactly one
   uniform draw, `generator.random()`, from the row's own generator.

Invariants:
- A row's token depends only on its own logits, params, token history and generator, never on the
  other rows nor on its position in the batch: that is what makes a seeded request reproducible
  under continuous batching. Elementwise work runs over a contiguous buffer whose row length is a
  multiple of the SIMD width, and every reduction runs along a row, so even float rounding is the
  same whether a row is sampled alone or among 31 others.
- Truncation keeps every token whose probability is >= a per-row threshold: the most likely token
  is always kept, and tokens tied at the boundary are all kept (as vLLM's top_k does).
- A token whose probability is exactly 0 (masked, -inf logit, or padding) is never drawn.
- No id >= `vocab_size` is ever returned: a model's padding columns past its tokenizer's
  vocabulary count as -inf (vLLM and llama.cpp mask them too).

Speed: no Python loop runs over the vocabulary, and nothing sorts or partitions it. A truncated
row (top_k/top_p/min_p) collects the candidates above a probability level (a few hundred tokens
for real models), finds its threshold among them and draws among them; top_logprobs do the same.
An untruncated row draws by scanning block sums, then one block: a full-vocabulary cumsum is slow
in numpy. Greedy rows without logprobs cost one argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.engine.tokens import Tokenizer
from mlctrio.engine.types import SamplingParams, TokenLogprob, TopLogprob

__all__ = ["SampleOutput", "Sampler", "apply_penalties", "ban_tokens", "make_generator"]
__all__ += ["penalize_row", "sampling_vocab_size"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
# Token histories: any int sequence. An int64 ndarray avoids a conversion on every step.
TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]

_GREEDY_TEMPERATURE = 1e-5
# Draws scan block sums, then one block: 256 keeps both scans short for V around 32k-256k, and is a
# multiple of every SIMD width so each row of the padded buffer starts on the same lane.
_BLOCK = 256
# Probability levels (relative to the row's max) tried in turn to collect the candidates that a
# top_k / top_p / top_logprobs threshold needs; the last level takes the whole row.
_CANDIDATE_LEVELS = (2.0**-7, 2.0**-10, 2.0**-14, 2.0**-18, 2.0**-24, 0.0)


def make_generator(seed: int, branch_index: int) -> np.random.Generator:
    """The random stream of choice `branch_index` of a request seeded with `seed`.

    Independent of batch composition (each row draws only from its own stream) and of the other
    choices (each branch gets its own SeedSequence spawn key, so n > 1 choices differ). Any int
    seed works: negative seeds are folded into the non-negative range SeedSequence accepts.
    """
    entropy = seed % (1 << 128)
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(branch_index,)))
    )


def sampling_vocab_size(model_vocab_size: int, tokenizer: Tokenizer) -> int:
    """How many ids the sampler may draw: those the tokenizer knows, within the model's logits.

    Models often pad their vocabulary (a logits row wider than the tokenizer); sampling a padding
    id would break detokenizing, so those columns count as -inf (as vLLM and llama.cpp do). A
    special or EOS id past the tokenizer's count (a gap in added-token ids) stays drawable.
    """
    known = set(tokenizer.eos_token_ids) | set(getattr(tokenizer, "special_token_ids", ()))
    tokenizer_width = max(int(tokenizer.vocab_size), 1 + max(known, default=-1))
    return min(model_vocab_size, tokenizer_width)


@attrs.frozen(eq=False)  # numpy arrays make == ambiguous
class SampleOutput:
    """What one sampling step produced for a batch of B rows.

    `logprobs[i]` is the log-probability of `token_ids[i]` under log_softmax of the adjusted logits
    (after logit_bias and penalties, before temperature/top_k/top_p/min_p). `top_ids[i]` and
    `top_logprobs[i]` are the K most likely tokens of that same distribution, most likely first,
    ties broken by the lower id; K is the largest top_logprobs in the batch, so a row that asked
    for fewer uses only its first few. Rows that asked for no logprobs hold NaN and id -1. All three
    are None when no row asked for logprobs.
    """

    token_ids: IntArray
    logprobs: FloatArray | None = None
    top_ids: IntArray | None = None
    top_logprobs: FloatArray | None = None

    def token_logprob(
        self, row: int, num_top: int, token_bytes: Callable[[int], bytes]
    ) -> TokenLogprob:
        """Row `row` as the engine's TokenLogprob, with its first `num_top` alternatives.

        `token_bytes` is the tokenizer's; `token` is those bytes decoded, a lone piece of a UTF-8
        character showing as U+FFFD (the exact bytes are in `bytes`, as OpenAI does).
        """
        assert self.logprobs is not None and self.top_ids is not None
        assert self.top_logprobs is not None

        def describe(token_id: int) -> tuple[str, tuple[int, ...]]:
            raw = token_bytes(token_id)
            return raw.decode("utf-8", errors="replace"), tuple(raw)

        top = []
        for token_id, logprob in zip(
            self.top_ids[row, :num_top].tolist(),
            self.top_logprobs[row, :num_top].tolist(),
            strict=True,
        ):
            text, raw = describe(token_id)
            top.append(TopLogprob(token_id, text, logprob, raw))
        token_id = int(self.token_ids[row])
        text, raw = describe(token_id)
        return TokenLogprob(token_id, text, float(self.logprobs[row]), raw, tuple(top))


def _needs_penalties(p: SamplingParams) -> bool:
    return bool(
        p.logit_bias
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
    )


def penalize_row(
    row: FloatArray, p: SamplingParams, output_token_ids: TokenIds, prompt_token_ids: TokenIds
) -> None:
    """Apply logit_bias, repetition, presence and frequency penalties to one row, in place.

    Sparse: the cost is in the number of history tokens, not the vocabulary size.
    """
    vocab_size = row.shape[0]
    if p.logit_bias:
        ids = np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias))
        bias = np.fromiter(p.logit_bias.values(), np.float32, len(p.logit_bias))
        # protocol/ validates ids against the tokenizer; a model whose logits are narrower than
        # the tokenizer must not crash the whole batch over one request's bias.
        ok = (ids >= 0) & (ids < vocab_size)
        row[ids[ok]] += bias[ok]  # mapping keys are unique, so no scatter collisions
    output = np.asarray(output_token_ids, dtype=np.int64)
    if p.repetition_penalty != 1.0:
        seen = np.concatenate((np.asarray(prompt_token_ids, dtype=np.int64), output))
        # Gather before scatter: a repeated id computes the same value from the original logit,
        # so duplicates are harmless and penalise once, as HF's scatter does.
        values = row[seen]
        penalty = np.float32(p.repetition_penalty)
        row[seen] = np.where(values > 0, values / penalty, values * penalty)
    if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and output.size:
        ids, counts = np.unique(output, return_counts=True)
        row[ids] -= p.presence_penalty + p.frequency_penalty * counts


def apply_penalties(
    logits: FloatArray,
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[TokenIds],
    prompt_token_ids: Sequence[TokenIds],
) -> None:
    """Apply `penalize_row` to every row of `logits` (B, V) that needs it, in place."""
    for i, p in enumerate(params):
        if _needs_penalties(p):
            penalize_row(logits[i], p, output_token_ids[i], prompt_token_ids[i])


def ban_tokens(logits: FloatArray, banned: Sequence[IntArray | None]) -> None:
    """Set to -inf, in place, the logits of row i's `banned[i]` ids (None: none), so they are
    never sampled: ignore_eos bans every end-of-generation token, as llama.cpp does.

    Ids beyond the row are skipped. A row that would be left with no finite logit (a grammar that
    allows nothing but EOS) keeps its banned logits: the grammar's word wins.
    """
    width = logits.shape[1]
    for i, ids in enumerate(banned):
        if ids is None or ids.size == 0:
            continue
        ids = ids[ids < width]
        row = logits[i]
        saved = row[ids].copy()
        row[ids] = -np.inf
        if not np.isfinite(row.max()):
            row[ids] = saved


def _candidates(row: FloatArray, need_count: int, need_mass: float) -> IntArray:
    """Ids (ascending) of the tokens above the highest level that gives >= need_count tokens
    holding >= need_mass of the row's (unnormalised) probability.

    Everything a threshold can keep lies above that level, so only these few need sorting.
    """
    for level in _CANDIDATE_LEVELS:
        above = row >= np.float32(level)
        if np.count_nonzero(above) < need_count:  # counting is cheaper than extracting
            continue
        ids = np.flatnonzero(above)
        if need_mass <= 0.0 or float(row[ids].sum(dtype=np.float64)) >= need_mass:
            return ids
    return np.arange(row.size, dtype=np.int64)


def _truncation_threshold(values: FloatArray, total: float, top_k: int, top_p: float) -> float:
    """The smallest probability that top_k and then top_p keep.

    `values` are the candidate probabilities (any order), `total` the row's whole mass. top_p
    keeps the smallest set of most likely tokens whose mass reaches top_p (so at least one token),
    measured on the distribution renormalised after top_k, as vLLM does.
    """
    threshold = 0.0
    if top_k:
        # A partition, not a sort: with a flat tail the candidates can number thousands.
        threshold = float(np.partition(values, values.size - top_k)[values.size - top_k])
        values = values[values >= np.float32(threshold)]  # ties at the k-th are kept
        total = float(values.sum(dtype=np.float64))
    if top_p < 1.0:
        values = np.sort(values)[::-1]
        cumulative = np.cumsum(values, dtype=np.float64)
        last = min(int(np.searchsorted(cumulative, top_p * total)), values.size - 1)
        threshold = max(threshold, float(values[last]))
    return threshold


def _sample_truncated(row: FloatArray, p: SamplingParams, top_k: int, uniform: float) -> int:
    """Draw from one row of probabilities (max 1) truncated by top_k, top_p and min_p.

    Everything kept lies among a few candidates, so the draw scans only those: the row itself is
    neither masked nor summed beyond what top_p needs.
    """
    min_p = min(p.min_p, 1.0)  # relative to the max probability, which is 1 here
    threshold = min_p
    if top_k or p.top_p < 1.0:
        total = 0.0 if top_k else float(row.sum(dtype=np.float64))
        ids = _candidates(row, top_k, 0.0 if top_k else p.top_p * total)
        values = row[ids]
        cut = _truncation_threshold(values, total, top_k, p.top_p)
        threshold = max(threshold, cut)
    else:
        ids = np.flatnonzero(row >= np.float32(min_p))
        values = row[ids]
    weights = np.where(values >= np.float32(threshold), values, np.float32(0.0))
    cumulative = np.cumsum(weights, dtype=np.float64)
    # First strictly greater cumulative sum: a dropped (zero-weight) candidate is never chosen.
    index = int(np.count_nonzero(cumulative <= uniform * cumulative[-1]))
    if index >= ids.size:  # rounding put the target at the very end
        index = int(np.flatnonzero(weights)[-1])
    return int(ids[index])


def _inverse_cdf(probs: FloatArray, uniforms: npt.NDArray[np.float64]) -> IntArray:
    """Draw one id per row of `probs` (n, num_blocks * _BLOCK), unnormalised and >= 0.

    Finds the block where the cumulative mass crosses u * total, then the token inside it: two
    short cumsums instead of one over the vocabulary. The first strictly-greater cumulative sum
    is chosen, so a zero-probability token can never be the answer; rounding that pushes the
    target past the end falls back to the last non-zero token.
    """
    num_rows = probs.shape[0]
    arange = np.arange(num_rows)
    blocks = probs.reshape(num_rows, -1, _BLOCK)
    block_mass = blocks.sum(axis=2)
    cumulative = np.cumsum(block_mass, axis=1, dtype=np.float64)
    target = uniforms * cumulative[:, -1]
    block = np.count_nonzero(cumulative <= target[:, None], axis=1)
    last_block = block_mass.shape[1] - 1 - np.argmax(block_mass[:, ::-1] > 0, axis=1)
    block = np.minimum(block, last_block)
    before = np.where(block > 0, cumulative[arange, block - 1], 0.0)
    segment = blocks[arange, block]
    in_block = np.count_nonzero(
        np.cumsum(segment, axis=1, dtype=np.float64) <= (target - before)[:, None], axis=1
    )
    last_in_block = _BLOCK - 1 - np.argmax(segment[:, ::-1] > 0, axis=1)
    token_ids: IntArray = (block * _BLOCK + np.minimum(in_block, last_in_block)).astype(np.int64)
    return token_ids


@attrs.define
class Sampler:
    """Samples one token per row from a batch of logits. Stateless between steps; one per worker.

    `vocab_size` is how many ids may be drawn (`sampling_vocab_size`). Logits may be wider (models
    pad their vocabulary): the columns past it are never drawn nor listed in top_logprobs, and the
    logprobs are normalised without them, exactly as if they were -inf.
    """

    vocab_size: int
    _padded_vocab: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._padded_vocab = -(-self.vocab_size // _BLOCK) * _BLOCK

    def sample(
        self,
        logits: FloatArray,
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator],
        output_token_ids: Sequence[TokenIds],
        prompt_token_ids: Sequence[TokenIds],
    ) -> SampleOutput:
        """Sample row i of `logits` (B, >= vocab_size) with params[i] and generators[i].

        `logits` may be modified in place (penalties). Histories feed the penalties only; the
        greedy, no-penalty, no-logprobs case is a single argmax.
        """
        num_rows = len(params)
        assert logits.ndim == 2 and logits.shape[0] == num_rows, (logits.shape, num_rows)
        assert logits.shape[1] >= self.vocab_size, (logits.shape, self.vocab_size)
        x = np.asarray(logits, dtype=np.float32)[:, : self.vocab_size]
        apply_penalties(x, params, output_token_ids, prompt_token_ids)

        temperatures = np.fromiter((p.temperature for p in params), np.float64, num_rows)
        greedy = temperatures <= _GREEDY_TEMPERATURE
        token_ids = np.empty(num_rows, dtype=np.int64)
        if greedy.all():
            token_ids[:] = x.argmax(axis=1)
        else:
            greedy_rows = np.flatnonzero(greedy)
            if greedy_rows.size:
                token_ids[greedy_rows] = x[greedy_rows].argmax(axis=1)
            rows = np.flatnonzero(~greedy)
            token_ids[rows] = self._sample_rows(x, rows, temperatures[rows], params, generators)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs > 0]
        if not logprob_rows:
            return SampleOutput(token_ids)
        return self._with_logprobs(x, token_ids, np.array(logprob_rows, dtype=np.int64), params)

    def _sample_rows(
        self,
        x: FloatArray,
        rows: IntArray,
        temperatures: npt.NDArray[np.float64],
        params: Sequence[SamplingParams],
        generators: Sequence[np.random.Generator],
    ) -> IntArray:
        """Temperature, truncation and one draw for each of `rows` (none greedy)."""
        vocab_size = self.vocab_size
        # Contiguous, padded to a whole number of blocks: the padding is -inf, so probability 0.
        probs = np.empty((rows.size, self._padded_vocab), dtype=np.float32)
        probs[:, vocab_size:] = -np.inf
        selected = x if rows.size == x.shape[0] else x[rows]
        np.divide(selected, temperatures.astype(np.float32)[:, None], out=probs[:, :vocab_size])
        probs -= probs.max(axis=1, keepdims=True)
        np.exp(probs, out=probs)  # unnormalised probabilities, the row max is exactly 1

        # Exactly one draw per sampled row, from that row's own stream.
        uniforms = np.fromiter((generators[i].random() for i in rows), np.float64, rows.size)
        token_ids = np.empty(rows.size, dtype=np.int64)
        plain = np.ones(rows.size, dtype=bool)
        for j, row_index in enumerate(rows):
            p = params[row_index]
            top_k = p.top_k if 0 < p.top_k < vocab_size else 0
            if top_k or p.top_p < 1.0 or p.min_p > 0.0:
                plain[j] = False
                token_ids[j] = _sample_truncated(probs[j, :vocab_size], p, top_k, uniforms[j])
        if plain.all():
            token_ids[:] = _inverse_cdf(probs, uniforms)
        elif plain.any():
            token_ids[plain] = _inverse_cdf(probs[plain], uniforms[plain])
        return token_ids

    def _with_logprobs(
        self,
        x: FloatArray,
        token_ids: IntArray,
        rows: IntArray,
        params: Sequence[SamplingParams],
    ) -> SampleOutput:
        """Attach log_softmax(x) of the chosen tokens and the top-K alternatives for `rows`."""
        num_rows = x.shape[0]
        k = min(max(params[i].top_logprobs for i in rows), self.vocab_size)
        logprobs = np.full(num_rows, np.nan, dtype=np.float32)
        top_ids = np.full((num_rows, k), -1, dtype=np.int64)
        top_logprobs = np.full((num_rows, k), np.nan, dtype=np.float32)

        # The tokens are chosen, so x (the caller's, modifiable) can be reused when all rows ask.
        shifted = x if rows.size == num_rows else x[rows]
        shifted -= shifted.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        log_total = np.log(probs.sum(axis=1, dtype=np.float64))
        arange = np.arange(rows.size)
        logprobs[rows] = shifted[arange, token_ids[rows]] - log_total
        if k:
            for j, row_index in enumerate(rows):
                ids = _candidates(probs[j], k, 0.0)
                # Stable sort of ascending ids: equal logprobs list the lower id first.
                best = ids[np.argsort(-shifted[j, ids], kind="stable")[:k]]
                top_ids[row_index] = best
                top_logprobs[row_index] = shifted[j, best] - log_total[j]
        return SampleOutput(token_ids, logprobs, top_ids, top_logprobs)
