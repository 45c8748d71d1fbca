"""`EngineCore`: one synchronous engine step at a time — plan, run the model, sample, detokenize.

Driven by ONE worker thread (the trio bridge in service.py calls it); not thread-safe.

Rules:

* Every request ends with exactly one final `RequestOutput` (`finished=True`), whatever ends it:
  stop, length, abort, engine error. Each choice gets `finish_reason` exactly once, on its last
  delta. An abort (or `close()`) puts "abort" on every choice not yet finished.
* Text goes token → per-choice incremental detokenizer → stop matcher (hold-back) → delta, so a
  delta never splits a UTF-8 character nor leaks part of a stop string. Stop tokens appear in
  `token_ids` (and usage) but neither their text nor a logprob entry is emitted. Tokens generated
  before a preemption are kept and never emitted twice.
* `Usage`: the prompt counted once (also for n > 1), completion tokens summed over choices.
* A runner or sampler exception fails the requests of that batch (final record with `error`,
  finish_reason "error") and the engine lives on.
* After each step the scheduler's page mirror equals the runner's cache (checked by the tests).
* `ignore_eos`: every end-of-generation token (engine/stop.py) gets a -inf logit before
  sampling (after the grammar mask), as in llama.cpp.
* Prefix cache (`prefix_cache_mode="radix"`): a finished request's KV stays in the runner as a
  cached sequence, so an idle engine has `free_pages + num_cached_pages == total_pages`; `close()`
  removes cached sequences too. Output is the same with and without it; `Usage.cached_tokens`
  counts the prompt tokens it saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np
import numpy.typing as npt

from ..config import EngineConfig
from ..engine.request import Request
from ..engine.runner import ModelRunner
from ..engine.scheduler import BatchEntry, Scheduler, StepPlan
from ..engine.stop import StopMatcher, StopTokens, finish_for_token, named_eog_ids
from ..engine.tokens import IncrementalDetokenizer, Tokenizer
from ..engine.types import (
    ChoiceDelta,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ..errors import EngineError
from .grammar import apply_bitmasks
from .sampler import SampleOutput, Sampler, ban_tokens, make_generator

log = logging.getLogger(__name__)


def _special_eog_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens that llama.cpp treats as end-of-generation (by name)."""
    specials = getattr(tokenizer, "special_token_ids", None)
    id_to_token = getattr(tokenizer, "id_to_token", None)
    if specials is None or id_to_token is None:
        return frozenset()
    return named_eog_ids({i: str(id_to_token(i)) for i in specials})


@runtime_checkable
class PromptAwareRunner(Protocol):
    """Optional runner hook: told how many of a new sequence's tokens are the prompt.

    Real models do not need it. The echo fake does, because "echo the prompt" is not a function of
    the token sequence alone (chunked prefill and recompute look exactly like generation to it).
    """

    def set_prompt_length(self, seq_id: int, num_prompt_tokens: int) -> None: ...


@attrs.frozen
class EngineStats:
    """A snapshot of the engine for /metrics and /debug."""

    num_running: int
    num_waiting: int
    num_preemptions_total: int
    free_pages: int
    total_pages: int
    kv_cache_usage_ratio: float  # used / total
    num_prompt_tokens_total: int  # prompt tokens of admitted requests, each request once
    num_generation_tokens_total: int  # tokens sampled
    num_prefix_cache_query_tokens_total: int = 0  # tokens looked up when prefills started
    num_prefix_cache_hit_tokens_total: int = 0  # of which reused (not computed)
    num_steps_total: int = 0
    num_cached_pages: int = 0  # held only by the prefix cache: reclaimable, not free


@attrs.define
class _Choice:
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: np.random.Generator
    done: bool = False
    matcher: Any = None  # grammar.GrammarMatcher for a constrained choice


@attrs.define
class _Tracked:
    req: Request
    choices: list[_Choice]
    stop_tokens: StopTokens
    banned: npt.NDArray[np.int64] | None = None  # ignore_eos: logits set to -inf
    deltas: list[ChoiceDelta] = attrs.field(factory=list)  # this step's, flushed by _emit
    prefill_started: bool = False
    prefill_done: bool = False


class EngineCore:
    """The synchronous engine: owns the scheduler, the sampler and (through it) the runner."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        extra_stop_token_ids: Sequence[int] = (),
        clock: Callable[[], float] = time.monotonic,
        constraints: Any = None,
    ) -> None:
        """`constraints` (runtime.constraints.ConstraintCompiler) enables OutputConstraints;
        without it a constrained request is refused at add_request."""
        if runner.free_pages() != runner.total_pages():
            raise EngineError("the runner's KV cache must start empty")
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self._clock = clock
        self._extra_stop_ids = tuple(extra_stop_token_ids)
        self._eog_ids = _special_eog_ids(tokenizer)
        self._constraints = constraints
        self._hint = runner if isinstance(runner, PromptAwareRunner) else None
        self.scheduler = Scheduler(
            total_pages=runner.total_pages(),
            page_size=runner.page_size,
            max_num_sequence=min(config.max_num_sequence, runner.max_num_sequence),
            prefill_chunk_size=config.prefill_chunk_size,
            context_window_size=min(config.context_window_size, runner.context_window_size),
            prefix_cache_max_num_seqs=(
                config.prefix_cache_max_num_recycling_seqs
                if config.prefix_cache_mode == "radix"
                else 0
            ),
        )
        self._sampler = Sampler(runner.vocab_size)
        self._seed_rng = np.random.default_rng()  # seeds requests that bring none
        self._tracked: dict[str, _Tracked] = {}
        self._ready: list[RequestOutput] = []  # finished at add(): delivered by the next step
        self._live_seqs: set[int] = set()  # sequences that exist in the runner
        self._token_text: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._closed = False
        self._num_prompt_tokens_total = 0
        self._num_generation_tokens_total = 0
        self._num_steps_total = 0
        self._events: list[tuple[str, str, float]] = []  # (request_id, name, time), drained

    # -- public API ---------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request. Raises PromptTooLongError (a ContextLengthExceededError) when the
        prompt can never fit, EngineError after close()."""
        if self._closed:
            raise EngineError("the engine is closed")
        params = request.params
        matchers: list[Any] = [None] * params.n
        if params.constraint is not None:
            if self._constraints is None:
                raise EngineError("this model does not support constrained output")
            # Compiled (or taken from the cache) before admission: a bad schema fails here.
            matchers = [self._constraints.matcher(params.constraint) for _ in range(params.n)]
        req = self.scheduler.add(request)
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**63))
        choices = [
            _Choice(
                detok=self.tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens),
                stop=StopMatcher(params.stop),
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
        banned = np.fromiter(sorted(stop_tokens.banned_ids), np.int64)
        tracked = _Tracked(req, choices, stop_tokens, banned if banned.size else None)
        self._num_prompt_tokens_total += req.num_prompt_tokens
        if req.is_terminal:  # no room for a single token: "length" at once
            for i in range(params.n):
                self._finish(tracked, i, "length")
            self._ready.append(self._output(tracked))
        else:
            self._tracked[request.request_id] = tracked

    def abort_request(self, request_id: str, reason: str = "abort") -> None:
        """Abort at the next step boundary; unknown or finished ids are ignored.

        Every unfinished choice then ends with finish_reason "abort"; `reason` (e.g.
        "disconnect", "deadline", "shutdown") is only logged.
        """
        log.debug("abort %s (%s)", request_id, reason)
        self.scheduler.abort(request_id, reason)

    def has_work(self) -> bool:
        return bool(self._ready) or self.scheduler.has_work()

    def set_launch_hook(self, hook: Callable[[], None] | None) -> None:
        """Called once per step right before the model computes (engine.runner.ModelRunner)."""
        self.runner.launch_hook = hook

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns this step's outputs (at most one per request)."""
        if self._closed:
            return []
        outputs, self._ready = self._ready, []
        plan = self.scheduler.schedule()
        self._num_steps_total += 1
        touched: dict[str, _Tracked] = {}
        for req in plan.aborted:
            tracked = self._tracked[req.request_id]
            for i, choice in enumerate(tracked.choices):
                if not choice.done:
                    self._finish(tracked, i, "abort")
            touched[req.request_id] = tracked
        for req, index in plan.length_capped:
            tracked = self._tracked[req.request_id]
            self._finish(tracked, index, "length", text=self._final_text(tracked.choices[index]))
            touched[req.request_id] = tracked
        now = self._clock()
        for entry in plan.entries:
            started = self._tracked.get(entry.request.request_id)
            if started is not None and not started.prefill_started:
                started.prefill_started = True
                self._events.append((entry.request.request_id, "prefill_start", now))
        try:
            sampled = self._run(plan)
        except Exception as exc:
            log.exception("engine step failed; failing %d request(s)", len(plan.entries))
            outputs.extend(self._fail_batch(plan, f"engine error: {exc!r}", touched))
        else:
            now = self._clock()
            for entry, index, row, out in sampled:
                tracked = self._tracked[entry.request.request_id]
                if not tracked.prefill_done:
                    tracked.prefill_done = True
                    self._events.append((entry.request.request_id, "prefill_end", now))
                self._on_token(tracked, index, row, out)
                touched[entry.request.request_id] = tracked
        for tracked in touched.values():
            outputs.append(self._output(tracked))
        return outputs

    def drain_events(self) -> list[tuple[str, str, float]]:
        """Engine-side request events since the last call: (request_id, name, clock time) for
        "prefill_start" (first scheduled) and "prefill_end" (prompt computed, first sample)."""
        events, self._events = self._events, []
        return events

    def stats(self) -> EngineStats:
        pool = self.scheduler.pool
        cache = self.scheduler.prefix_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions_total=self.scheduler.num_preemptions_total,
            free_pages=pool.num_free,
            total_pages=pool.total_pages,
            kv_cache_usage_ratio=pool.num_used / pool.total_pages,
            num_prompt_tokens_total=self._num_prompt_tokens_total,
            num_generation_tokens_total=self._num_generation_tokens_total,
            num_steps_total=self._num_steps_total,
            num_prefix_cache_query_tokens_total=cache.num_query_tokens_total if cache else 0,
            num_prefix_cache_hit_tokens_total=cache.num_hit_tokens_total if cache else 0,
            num_cached_pages=cache.num_cached_pages() if cache else 0,
        )

    def close(self) -> list[RequestOutput]:
        """Abort everything still in flight and close the runner; returns the final records."""
        if self._closed:
            return []
        outputs, self._ready = self._ready, []
        for tracked in list(self._tracked.values()):
            self._remove_seqs(self.scheduler.fail(tracked.req))
            for i, choice in enumerate(tracked.choices):
                if not choice.done:
                    self._finish(tracked, i, "abort")
            outputs.append(self._output(tracked))
        self._remove_seqs(self.scheduler.clear_prefix_cache())
        self._closed = True
        self.runner.close()
        return outputs

    # -- one step -----------------------------------------------------------------------------

    def _run(self, plan: StepPlan) -> list[tuple[BatchEntry, int, int, SampleOutput]]:
        """Execute the plan on the runner and sample; returns (entry, branch, row, output)."""
        self._remove_seqs(plan.removed_seq_ids)
        for seq_id in plan.added_seq_ids:
            self.runner.add_sequence(seq_id)
            self._live_seqs.add(seq_id)
        for parent, child, fork_pos in plan.cache_forks:
            self.runner.fork_sequence(parent, child, fork_pos)
            self._live_seqs.add(child)
        if not plan.entries:
            return []
        if self._hint is not None:
            new = {*plan.added_seq_ids, *(child for _, child, _ in plan.cache_forks)}
            for entry in plan.entries:
                if entry.seq_id in new:  # (a cache fork would inherit another request's)
                    self._hint.set_prompt_length(entry.seq_id, entry.request.num_prompt_tokens)
        logits = self.runner.step([(e.seq_id, e.token_ids) for e in plan.entries])
        for entry in plan.entries:
            for child in entry.fork_seq_ids:
                self.runner.fork_sequence(entry.seq_id, child)
                self._live_seqs.add(child)
        rows = [(e, i, r) for r, e in enumerate(plan.entries) for i in e.sample_branches]
        if not rows:
            return []
        branches = [e.request.branches[i] for e, i, _ in rows]
        choices = [self._tracked[e.request.request_id].choices[i] for e, i, _ in rows]
        selected = logits[np.fromiter((r for _, _, r in rows), np.int64, len(rows))]
        matchers = [c.matcher for c in choices]
        if any(m is not None for m in matchers):
            # Grammar masks on the constrained rows only; unconstrained rows pay nothing.
            apply_bitmasks(selected, matchers)
        banned = [self._tracked[e.request.request_id].banned for e, _, _ in rows]
        if any(b is not None for b in banned):
            ban_tokens(selected, banned)
        out = self._sampler.sample(
            selected,
            [e.request.spec.params for e, _, _ in rows],
            [c.generator for c in choices],
            [b.output for b in branches],
            [e.request.spec.prompt_token_ids for e, _, _ in rows],
        )
        return [(e, i, k, out) for k, (e, i, _) in enumerate(rows)]

    def _on_token(self, tracked: _Tracked, index: int, row: int, out: SampleOutput) -> None:
        req = tracked.req
        choice = tracked.choices[index]
        token_id = int(out.token_ids[row])
        self.scheduler.append_token(req, index, token_id)
        self._num_generation_tokens_total += 1
        branch = req.branches[index]
        stop_reason: str | int | None
        reason, stop_reason = finish_for_token(
            tracked.stop_tokens, token_id, branch.num_generated, req.max_new_tokens
        )
        stopped_by_token = reason == "stop"
        if choice.matcher is not None and not stopped_by_token:
            choice.matcher.accept_token(token_id)
            if reason is None and (choice.matcher.is_stopped() or choice.matcher.is_terminated()):
                reason = "stop"  # the grammar is complete: this token's text still counts
        if stopped_by_token:  # a stop token: its text is not emitted
            text = self._final_text(choice)
        else:
            text = choice.stop.push(choice.detok.push(token_id))
            if reason == "length" and choice.stop.matched is None:
                text += self._final_text(choice)
        if choice.stop.matched is not None:  # a stop string wins, even one completed by a flush
            reason, stop_reason = "stop", choice.stop.matched
        # A stop token is not part of the content, so (as OpenAI) it has no logprob entry either:
        # the logprobs of a choice always spell exactly its text.
        logprobs = self._logprobs(req, row, out, token_id)
        if stopped_by_token and logprobs is not None:
            logprobs = ()
        if reason is None:
            tracked.deltas.append(ChoiceDelta(index, text, (token_id,), logprobs))
            return
        self._finish(tracked, index, reason, stop_reason, text, (token_id,), logprobs)

    def _finish(
        self,
        tracked: _Tracked,
        index: int,
        reason: FinishReason,
        stop_reason: str | int | None = None,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> None:
        """Close one choice: its final delta, and its sequence back to the pool."""
        choice = tracked.choices[index]
        assert not choice.done, "a choice finishes once"
        choice.done = True
        req = tracked.req
        if not req.is_terminal and not req.branches[index].finished:
            self._remove_seqs(self.scheduler.finish_branch(req, index))
        tracked.deltas.append(ChoiceDelta(index, text, token_ids, logprobs, reason, stop_reason))

    def _final_text(self, choice: _Choice) -> str:
        text = choice.stop.push(choice.detok.flush())
        return text if choice.stop.matched is not None else text + choice.stop.flush()

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
            top = tuple(
                TopLogprob(tid, self._token_str(tid)[0], lp, self._token_str(tid)[1])
                for tid, lp in zip(ids, values, strict=True)
            )
        text, raw = self._token_str(token_id)
        return (TokenLogprob(token_id, text, float(out.logprobs[row]), raw, top),)

    def _token_str(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        cached = self._token_text.get(token_id)
        if cached is None:
            raw = self.tokenizer.token_bytes(token_id)
            cached = self._token_text[token_id] = (raw.decode("utf-8", "replace"), tuple(raw))
        return cached

    def _output(self, tracked: _Tracked, error: str | None = None) -> RequestOutput:
        req = tracked.req
        deltas, tracked.deltas = tuple(sorted(tracked.deltas, key=lambda d: d.index)), []
        if req.is_terminal:
            self._tracked.pop(req.request_id, None)
        usage = Usage(
            req.num_prompt_tokens,
            sum(b.num_generated for b in req.branches),
            req.num_cached_prompt_tokens or 0,
        )
        return RequestOutput(
            req.request_id, deltas, usage, req.is_terminal, error, req.num_preemptions
        )

    def _fail_batch(
        self, plan: StepPlan, message: str, touched: dict[str, _Tracked]
    ) -> list[RequestOutput]:
        """Final error records for every request of a failed batch."""
        outputs = []
        for entry in plan.entries:
            tracked = self._tracked.get(entry.request.request_id)
            if tracked is None or entry.request.is_terminal:
                continue
            self._remove_seqs(self.scheduler.fail(entry.request), best_effort=True)
            for i, choice in enumerate(tracked.choices):
                if not choice.done:
                    self._finish(tracked, i, "error")
            touched.pop(entry.request.request_id, None)
            outputs.append(self._output(tracked, error=message))
        return outputs

    def _remove_seqs(self, seq_ids: Sequence[int], *, best_effort: bool = False) -> None:
        for seq_id in seq_ids:
            if seq_id not in self._live_seqs:
                continue
            self._live_seqs.discard(seq_id)
            try:
                self.runner.remove_sequence(seq_id)
            except Exception:
                if not best_effort:
                    raise
                log.exception("could not remove sequence %d after a failed step", seq_id)
