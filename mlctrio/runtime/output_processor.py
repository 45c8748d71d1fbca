"""`OutputProcessor`: turns each request's sampled tokens into `ChoiceDelta`s and `RequestOutput`s.

It owns the per-request choice state — incremental detokenizer, stop matcher, random stream,
grammar matcher — and nothing else: it never touches the scheduler or the runner. `EngineCore`
(runtime/core.py) admits requests, runs the step loop and releases a choice's sequence when
`on_token` says the choice ended.

Rules:

* Text goes token → per-choice incremental detokenizer → stop matcher (hold-back) → delta, so a
  delta never splits a UTF-8 character nor leaks part of a stop string. Stop tokens appear in
  `token_ids` (and usage) but neither their text nor a logprob entry is emitted, so the logprobs
  of a choice always spell exactly its text (as OpenAI).
* `min_tokens`: until a choice has that many tokens its stop matcher is disarmed and
  `banned_for` bans every stop and end-of-generation id (engine/stop.py). With
  `include_stop_str`, a matched stop string, and the text and logprob of a stop token, are
  emitted.
* A stop string wins over every other reason, even one completed by the final flush. A grammar
  that completes ends the choice with "stop"; the token that completed it still counts as text.
* Each choice gets `finish_reason` exactly once, on its last delta (`finish` asserts it).
* `Usage`: the prompt counted once (also for n > 1), completion tokens summed over choices: the
  tokens delivered in deltas (a token whose processing failed is not counted).
* Any method may raise on a bad token (a tokenizer or grammar error): the core runs each
  request's processing under a guard, so such an exception fails only that request, and
  `error_output` (which touches no tokenizer) still ends it with one final record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from ..engine.request import Request
from ..engine.stop import StopMatcher, StopTokens, finish_for_token, named_eog_ids
from ..engine.tokens import IncrementalDetokenizer, Tokenizer
from ..engine.types import (
    ChoiceDelta,
    FinishReason,
    RequestOutput,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .prompt_outputs import PromptOutputs
from .sampler import SampleOutput, make_generator


def special_eog_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens that llama.cpp treats as end-of-generation (by name)."""
    specials = getattr(tokenizer, "special_token_ids", None)
    id_to_token = getattr(tokenizer, "id_to_token", None)
    if specials is None or id_to_token is None:
        return frozenset()
    return named_eog_ids({i: str(id_to_token(i)) for i in specials})


@attrs.define
class ChoiceState:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: np.random.Generator
    done: bool = False
    matcher: Any = None  # grammar.GrammarMatcher for a constrained choice
    num_emitted: int = 0  # tokens in its queued deltas (what the client gets)


@attrs.define
class RequestState:
    """One admitted request's output state; `deltas` are this step's, taken by `output`."""

    req: Request
    choices: list[ChoiceState]
    stop_tokens: StopTokens
    banned: npt.NDArray[np.int64] | None = None  # ignore_eos: logits set to -inf
    early_banned: npt.NDArray[np.int64] | None = None  # banned before min_tokens
    deltas: list[ChoiceDelta] = attrs.field(factory=list)
    prefill_started: bool = False
    prefill_done: bool = False
    #: prompt logprobs / embedding accumulation (runtime/prompt_outputs.py), None when unasked
    prompt: PromptOutputs | None = None
    embedding: npt.NDArray[np.float32] | None = None  # an embedding request's result, once computed
    #: speculative decoding: drafts verified, tokens drafted, drafted tokens accepted
    spec_counts: tuple[int, int, int] = (0, 0, 0)

    def banned_for(self, index: int) -> npt.NDArray[np.int64] | None:
        """The ids choice `index` may not sample next (min_tokens, ignore_eos), or None."""
        if self.req.branches[index].num_generated < self.req.spec.params.min_tokens:
            return self.early_banned
        return self.banned


def _ids(ids: frozenset[int]) -> npt.NDArray[np.int64] | None:
    return np.fromiter(sorted(ids), np.int64) if ids else None


class OutputProcessor:
    """Per-request output state and the token → text → delta pipeline; see the module rules."""

    def __init__(self, tokenizer: Tokenizer, extra_stop_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self._extra_stop_ids = tuple(extra_stop_token_ids)
        self._eog_ids = special_eog_ids(tokenizer)
        self._token_text: dict[int, tuple[str, tuple[int, ...]]] = {}

    def track(self, req: Request, seed: int, matchers: Sequence[Any]) -> RequestState:
        """The output state of a request just admitted by the scheduler."""
        params = req.spec.params
        choices = [
            ChoiceState(
                detok=self.tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens),
                stop=StopMatcher(params.stop, include=params.include_stop_str),
                generator=make_generator(seed, i),
                matcher=matchers[i],
            )
            for i in range(params.n)
        ]
        stop_tokens = StopTokens.build(
            self.tokenizer.eos_token_ids,
            self._extra_stop_ids,
            params.stop_token_ids,
            ignore_eos=params.ignore_eos,
            eog_ids=self._eog_ids,
        )
        banned = _ids(stop_tokens.banned_ids)
        early = _ids(stop_tokens.early_banned_ids) if params.min_tokens else None
        prompt = PromptOutputs.for_request(req.spec)
        return RequestState(req, choices, stop_tokens, banned, early, prompt=prompt)

    def on_token(
        self, state: RequestState, index: int, row: int, out: SampleOutput
    ) -> FinishReason | None:
        """Process choice `index`'s new token (row `row` of `out`, already appended to its
        branch); returns the reason when it ended the choice (its final delta is queued)."""
        req = state.req
        choice = state.choices[index]
        token_id = int(out.token_ids[row])
        reason: FinishReason | None
        stop_reason: str | int | None
        num_generated = req.branches[index].num_generated
        reason, stop_reason = finish_for_token(
            state.stop_tokens, token_id, num_generated, req.max_new_tokens
        )
        stopped_by_token = reason == "stop"
        choice.stop.armed = num_generated > req.spec.params.min_tokens
        keep_stop_token = stopped_by_token and req.spec.params.include_stop_str
        if choice.matcher is not None and not stopped_by_token:
            choice.matcher.accept_token(token_id)
            if reason is None and (choice.matcher.is_stopped() or choice.matcher.is_terminated()):
                reason = "stop"  # the grammar is complete: this token's text still counts
        if stopped_by_token:  # a stop token: its text is not emitted (unless include_stop_str)
            text = choice.stop.push(choice.detok.push(token_id)) if keep_stop_token else ""
            text += self.final_text(choice)
        else:
            text = choice.stop.push(choice.detok.push(token_id))
            if reason == "length" and choice.stop.matched is None:
                text += self.final_text(choice)
        if choice.stop.matched is not None:  # a stop string wins, even one completed by a flush
            reason, stop_reason = "stop", choice.stop.matched
        logprobs = self._logprobs(req, row, out, token_id)
        if stopped_by_token and not keep_stop_token and logprobs is not None:
            logprobs = ()
        if reason is None:
            self._queue(state, ChoiceDelta(index, text, (token_id,), logprobs))
            return None
        self.finish(state, index, reason, stop_reason, text, (token_id,), logprobs)
        return reason

    def finish(
        self,
        state: RequestState,
        index: int,
        reason: FinishReason,
        stop_reason: str | int | None = None,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> None:
        """Queue choice `index`'s final delta (the caller releases its sequence)."""
        choice = state.choices[index]
        assert not choice.done, "a choice finishes once"
        choice.done = True
        self._queue(state, ChoiceDelta(index, text, token_ids, logprobs, reason, stop_reason))

    def finish_all(self, state: RequestState, reason: FinishReason) -> None:
        """Finish every choice not yet finished, with no more text (abort, error)."""
        for i, choice in enumerate(state.choices):
            if not choice.done:
                self.finish(state, i, reason)

    def final_text(self, choice: ChoiceState) -> str:
        """What the choice still holds back, at its end (a stop string still cuts it)."""
        text = choice.stop.push(choice.detok.flush())
        return text if choice.stop.matched is not None else text + choice.stop.flush()

    def output(self, state: RequestState, error: str | None = None) -> RequestOutput:
        """The request's record for this step: its queued deltas, by choice."""
        req = state.req
        deltas, state.deltas = tuple(sorted(state.deltas, key=lambda d: d.index)), []
        usage = Usage(
            req.num_prompt_tokens,
            sum(c.num_emitted for c in state.choices),
            req.num_cached_prompt_tokens or 0,
        )
        prompt_logprobs = None
        if state.prompt is not None and state.prefill_done:
            prompt_logprobs = state.prompt.take_logprobs()
        return RequestOutput(
            req.request_id,
            deltas,
            usage,
            req.is_terminal,
            error,
            req.num_preemptions,
            prompt_logprobs,
            state.embedding,
            state.spec_counts if req.is_terminal and state.spec_counts[0] else None,
        )

    def error_output(self, state: RequestState, message: str) -> RequestOutput:
        """The final record of a request that failed: every unfinished choice ends with "error".

        Touches no tokenizer, so it works whatever broke. The request must be terminal already
        (the caller has failed it in the scheduler)."""
        for i, choice in enumerate(state.choices):
            if not choice.done:
                choice.done = True
                state.deltas.append(ChoiceDelta(i, finish_reason="error"))
        return self.output(state, error=message)

    @staticmethod
    def _queue(state: RequestState, delta: ChoiceDelta) -> None:
        state.choices[delta.index].num_emitted += len(delta.token_ids)
        state.deltas.append(delta)

    def _logprobs(
        self, req: Request, row: int, out: SampleOutput, token_id: int
    ) -> tuple[TokenLogprob, ...] | None:
        params = req.spec.params
        if not params.logprobs or out.logprobs is None:
            return None
        top: tuple[TopLogprob, ...] = ()
        if params.top_logprobs and out.top_ids is not None and out.top_logprobs is not None:
            ids = out.top_ids[row, : params.top_logprobs].tolist()
            values = out.top_logprobs[row, : params.top_logprobs].tolist()
            top = tuple(self._top(tid, lp) for tid, lp in zip(ids, values, strict=True))
        text, raw = self.token_str(token_id)
        return (TokenLogprob(token_id, text, float(out.logprobs[row]), raw, top),)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text, raw = self.token_str(token_id)
        return TopLogprob(token_id, text, logprob, raw)

    def token_str(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """A token's text (invalid UTF-8 replaced) and its raw bytes, cached by id."""
        cached = self._token_text.get(token_id)
        if cached is None:
            raw = self.tokenizer.token_bytes(token_id)
            cached = self._token_text[token_id] = (raw.decode("utf-8", "replace"), tuple(raw))
        return cached
