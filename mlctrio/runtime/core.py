"""`EngineCore`: one synchronous engine step at a time — admit, plan, run the model, sample.

Driven by ONE worker thread (the trio bridge in service.py calls it); not thread-safe. What a
sampled token becomes (text, stops, logprobs, grammar, records) is `OutputProcessor`'s job
(runtime/output_processor.py); this module admits requests, runs the step loop, keeps the runner
in step with the scheduler and counts the statistics.

Rules:

* Every request ends with exactly one final `RequestOutput` (`finished=True`), whatever ends it:
  stop, length, abort, engine error. An abort (or `close()`) puts "abort" on every choice not yet
  finished. Tokens generated before a preemption are kept and never emitted twice.
* Failures are contained as narrowly as they can be:
  - a runner or sampler exception fails the requests of that batch;
  - an exception in one request's own work (grammar mask or advance, detokenizing, stop matching,
    logprobs, building its record) fails that request only: the others of the batch go on;
  a failed request gets a final record with `error` and finish_reason "error" on its unfinished
  choices, its sequences leave the runner once (never to the prefix cache), the scheduler forgets
  it, and the engine lives on.
* After each step the scheduler's page mirror equals the runner's cache (checked by the tests).
* The sampler draws only ids the tokenizer knows (`sampling_vocab_size`): a model whose logits
  are wider than its tokenizer (a padded embedding table) never yields a padding id.
* `ignore_eos`: every end-of-generation token (engine/stop.py) gets a -inf logit before
  sampling (after the grammar mask), as in llama.cpp; so does every stop token of a choice that
  has fewer than `min_tokens` tokens.
* Prefix cache (`prefix_cache_mode="radix"`): a finished request's KV stays in the runner as a
  cached sequence, so an idle engine has `free_pages + num_cached_pages == total_pages`; `close()`
  removes cached sequences too. Output is the same with and without it; `Usage.cached_tokens`
  counts the prompt tokens it saved. `kv_cache_usage_ratio` counts the pages requests hold, not
  the reclaimable cached-only ones (vLLM's meaning), so a warm idle engine reports 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from ..config import EngineConfig
from ..engine.drafts import trim
from ..engine.request import Branch
from ..engine.runner import ModelRunner, PromptAwareRunner
from ..engine.scheduler import BatchEntry, Scheduler, StepPlan
from ..engine.tokens import Tokenizer
from ..engine.types import GenerationRequest, RequestOutput
from ..errors import EngineError
from .engine_stats import EngineStats, snapshot
from .forward import forward
from .output_processor import OutputProcessor, RequestState
from .row_sampling import one_row, sample_rows
from .sampler import SampleOutput, Sampler, sampling_vocab_size
from .speculative import Speculator, take_drafted

log = logging.getLogger(__name__)

_Sampled = list[tuple[BatchEntry, int, int, SampleOutput]]  # (entry, branch, row, output)


@attrs.define
class _Step:
    """One step's per-request results: who produced output, who failed (their final record)."""

    touched: dict[str, RequestState] = attrs.field(factory=dict)
    failed: dict[str, RequestOutput] = attrs.field(factory=dict)
    drafted: dict[int, Any] = attrs.field(factory=dict)  # entry index -> its rows (forward.py)


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
        speculator: Speculator | None = None,
    ) -> None:
        """`constraints` (runtime.constraints.ConstraintCompiler) enables OutputConstraints;
        without it a constrained request is refused at add_request. `speculator`
        (runtime/speculative.py) drafts tokens for decoding choices; None: plain decoding."""
        if runner.free_pages() != runner.total_pages():
            raise EngineError("the runner's KV cache must start empty")
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self._clock = clock
        self._constraints = constraints
        self._hint = runner if isinstance(runner, PromptAwareRunner) else None
        self._spec = speculator
        self.scheduler = Scheduler(
            total_pages=runner.total_pages(),
            page_size=runner.page_size,
            max_num_sequence=min(config.max_num_sequence, runner.max_num_sequence),
            prefill_chunk_size=config.prefill_chunk_size,
            prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding,
            context_window_size=min(config.context_window_size, runner.context_window_size),
            prefix_cache_max_num_seqs=(
                config.prefix_cache_max_num_recycling_seqs
                if config.prefix_cache_mode == "radix"
                else 0
            ),
            kv_window=getattr(runner, "kv_window", None),
        )
        self._out = OutputProcessor(tokenizer, extra_stop_token_ids)
        self._vocab = sampling_vocab_size(runner.vocab_size, tokenizer)
        self._sampler = Sampler(self._vocab)
        self._seed_rng = np.random.default_rng()  # seeds requests that bring none
        self._tracked: dict[str, RequestState] = {}
        self._ready: list[RequestOutput] = []  # finished at add(): delivered by the next step
        self._live_seqs: set[int] = set()  # sequences that exist in the runner
        self._closed = False
        self._num_prompt_tokens_total = 0
        self._num_generation_tokens_total = 0
        self._num_steps_total = 0
        self._num_requests_failed_total = 0
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
        try:
            state = self._out.track(req, seed, matchers)
        except BaseException:
            self.scheduler.fail(req)  # queued only: no sequence to remove
            raise
        self._num_prompt_tokens_total += req.num_prompt_tokens
        if req.is_terminal:  # no room for a single token: "length" at once
            self._out.finish_all(state, "length")
            self._ready.append(self._out.output(state))
        else:
            self._tracked[request.request_id] = state

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
        started = self._clock()
        plan = self.scheduler.schedule()
        if self._spec is not None:
            plan = self._spec.draft(plan, self.scheduler)
        self._num_steps_total += 1
        step = _Step()
        for req in plan.aborted:
            if (state := self._tracked.get(req.request_id)) is not None:
                self._guarded(step, state, self._out.finish_all, state, "abort")
        for req, index in plan.length_capped:
            if (state := self._tracked.get(req.request_id)) is not None:
                self._guarded(step, state, self._finish_capped, state, index)
        self._note_prefill_starts(plan)
        try:
            sampled = self._run(plan, step)
        except Exception as exc:
            log.exception("engine step failed; failing %d request(s)", len(plan.entries))
            self._fail_batch(plan, f"engine error: {exc!r}", step)
        else:
            now = self._clock()
            for entry, index, row, out in sampled:
                state = self._tracked.get(entry.request.request_id)
                if state is None or entry.request.request_id in step.failed:
                    continue  # failed earlier in this step: its other rows are moot
                if not state.prefill_done:
                    state.prefill_done = True
                    self._events.append((entry.request.request_id, "prefill_end", now))
                self._guarded(step, state, self._on_token, state, index, row, out)
            for k, rows in step.drafted.items():
                self._take_drafted(plan.entries[k], rows, step)
            for entry in plan.entries:
                if entry.request.spec.pooling is not None and entry.sample_branches:
                    if (state := self._tracked.get(entry.request.request_id)) is not None:
                        self._guarded(step, state, self._embedded, state)
        for request_id, state in step.touched.items():
            try:
                record = self._out.output(state)
            except Exception as exc:
                record = self._fail_request(state, exc)
            if record.finished:
                self._tracked.pop(request_id, None)
            outputs.append(record)
        outputs.extend(step.failed.values())
        if self._spec is not None:
            self._spec.step_done(self._clock() - started)
        return outputs

    def drain_events(self) -> list[tuple[str, str, float]]:
        """Engine-side request events since the last call: (request_id, name, clock time) for
        "prefill_start" (first scheduled) and "prefill_end" (prompt computed, first sample)."""
        events, self._events = self._events, []
        return events

    def stats(self) -> EngineStats:
        counts: dict[str, Any] = {
            "num_prompt_tokens_total": self._num_prompt_tokens_total,
            "num_generation_tokens_total": self._num_generation_tokens_total,
            "num_steps_total": self._num_steps_total,
            "num_requests_failed_total": self._num_requests_failed_total,
        }
        if self._spec is not None:
            counts.update(self._spec.stats_fields())
        return snapshot(self.scheduler, counts)

    def close(self) -> list[RequestOutput]:
        """Abort everything still in flight and close the runner; returns the final records."""
        if self._closed:
            return []
        outputs, self._ready = self._ready, []
        for state in list(self._tracked.values()):
            self._remove_seqs(self.scheduler.fail(state.req))
            self._out.finish_all(state, "abort")
            outputs.append(self._out.output(state))
        self._tracked.clear()
        self._remove_seqs(self.scheduler.clear_prefix_cache())
        self._closed = True
        self.runner.close()
        if self._spec is not None:
            self._spec.close()
        return outputs

    # -- one step -----------------------------------------------------------------------------

    def _note_prefill_starts(self, plan: StepPlan) -> None:
        now = self._clock()
        for entry in plan.entries:
            started = self._tracked.get(entry.request.request_id)
            if started is not None and not started.prefill_started:
                started.prefill_started = True
                self._events.append((entry.request.request_id, "prefill_start", now))

    def _run(self, plan: StepPlan, step: _Step) -> _Sampled:
        """Execute the plan on the runner and sample; returns (entry, branch, row, output)."""
        self._remove_seqs(plan.removed_seq_ids)
        for seq_id in plan.added_seq_ids:
            self.runner.add_sequence(seq_id)
            self._live_seqs.add(seq_id)
        for parent, child, fork_pos in plan.cache_forks:
            self.runner.fork_sequence(parent, child, fork_pos)
            self._live_seqs.add(child)
        for seq_id in plan.sliding_seq_ids:
            self.runner.enable_sliding_window(seq_id)  # type: ignore[attr-defined]
        if not plan.entries:
            return []
        if self._hint is not None:
            new = {*plan.added_seq_ids, *(child for _, child, _ in plan.cache_forks)}
            for entry in plan.entries:
                if entry.seq_id in new:  # (a cache fork would inherit another request's)
                    self._hint.set_prompt_length(entry.seq_id, entry.request.num_prompt_tokens)
        prompts = [self._tracked[e.request.request_id].prompt for e in plan.entries]
        logits, step.drafted = forward(
            self.runner, plan.entries, prompts, self._vocab, self._out.token_str
        )
        for entry in plan.entries:
            for child in entry.fork_seq_ids:
                self.runner.fork_sequence(entry.seq_id, child)
                self._live_seqs.add(child)
        return self._sample(plan, logits, step)

    def _sample(self, plan: StepPlan, logits: Any, step: _Step) -> _Sampled:
        """Mask and sample the rows that sample a token; requests whose mask fails drop out.
        Drafted entries are not among them: `_take_drafted` samples those position by position."""
        rows = [
            (e, i, r)
            for r, e in enumerate(plan.entries)
            for i in e.sample_branches
            if e.request.spec.pooling is None  # an embedding request ends instead (_embedded)
            and not e.num_draft
        ]
        states = [self._tracked[e.request.request_id] for e, _, _ in rows]
        selected = logits[np.fromiter((r for _, _, r in rows), np.int64, len(rows))]
        keep, out = sample_rows(
            self._sampler, [(e, i, s) for (e, i, _), s in zip(rows, states, strict=True)],
            selected, self._guard(step),
        )  # fmt: skip
        return [(rows[k][0], rows[k][1], j, out) for j, k in enumerate(keep) if out is not None]

    def _guard(self, step: _Step) -> Callable[..., bool]:
        def guard(state: RequestState, work: Callable[..., object], *args: Any) -> bool:
            self._guarded(step, state, work, *args)
            return state.req.request_id not in step.failed

        return guard

    def _take_drafted(self, entry: BatchEntry, rows: Any, step: _Step) -> None:
        """Verify a drafted entry (speculative.take_drafted), then drop the rejected KV."""
        state = self._tracked.get(entry.request.request_id)
        if state is None or entry.request.request_id in step.failed or self._spec is None:
            return
        index, guard = entry.sample_branches[0], self._guard(step)
        branch = entry.request.branches[index]

        def sample_at(k: int) -> SampleOutput | None:
            keep, out = sample_rows(self._sampler, [(entry, index, state)], one_row(rows, k), guard)
            return out if keep else None

        def consume(out: SampleOutput) -> bool:
            self._guarded(step, state, self._on_token, state, index, 0, out)
            return not (branch.finished or state.req.is_terminal)

        accepted = take_drafted(entry, sample_at, consume)
        drafts, drafted, kept = state.spec_counts
        state.spec_counts = (drafts + 1, drafted + entry.num_draft, kept + accepted)
        self._trim(branch)
        self._spec.record(entry, accepted)

    def _trim(self, branch: Branch) -> None:
        """Drop the cache positions past the branch's tokens minus one (speculative drafts)."""
        if (popped := trim(self.scheduler.pool, branch)) is not None:
            self.runner.popn(*popped)

    def _on_token(self, state: RequestState, index: int, row: int, out: SampleOutput) -> None:
        req = state.req
        self.scheduler.append_token(req, index, int(out.token_ids[row]))
        self._num_generation_tokens_total += 1
        if self._out.on_token(state, index, row, out) is not None:
            if not req.is_terminal and not req.branches[index].finished:
                self._trim(req.branches[index])
                self._remove_seqs(self.scheduler.finish_branch(req, index))

    def _embedded(self, state: RequestState) -> None:
        """An embedding request whose prompt is computed: its result ends it (not cached: an
        embedding burst must not evict the prompts of chat requests from the prefix cache)."""
        assert state.prompt is not None
        state.embedding = state.prompt.embedding()
        state.prefill_done = True
        self._events.append((state.req.request_id, "prefill_end", self._clock()))
        self._remove_seqs(self.scheduler.finish_branch(state.req, 0, cache=False))
        self._out.finish(state, 0, "stop")

    def _finish_capped(self, state: RequestState, index: int) -> None:
        """A choice the scheduler ended for lack of pages (its sequence is already gone)."""
        final = self._out.final_text(state.choices[index])
        self._out.finish(state, index, "length", text=final)

    # -- failures -----------------------------------------------------------------------------

    def _guarded(
        self, step: _Step, state: RequestState, work: Callable[..., object], *args: Any
    ) -> None:
        """Run one request's own work; an exception fails that request alone."""
        request_id = state.req.request_id
        if request_id in step.failed:
            return
        try:
            work(*args)
        except Exception as exc:
            step.touched.pop(request_id, None)
            step.failed[request_id] = self._fail_request(state, exc)
        else:
            step.touched[request_id] = state

    def _fail_request(self, state: RequestState, exc: BaseException) -> RequestOutput:
        """End a request after an error in its own work: its final record, carrying `error`."""
        log.error("request %s failed", state.req.request_id, exc_info=exc)
        return self._fail(state, f"engine error: {exc!r}")

    def _fail(self, state: RequestState, message: str) -> RequestOutput:
        self._remove_seqs(self.scheduler.fail(state.req), best_effort=True)
        self._tracked.pop(state.req.request_id, None)
        self._num_requests_failed_total += 1
        return self._out.error_output(state, message)

    def _fail_batch(self, plan: StepPlan, message: str, step: _Step) -> None:
        """Final error records for every request of a failed batch."""
        for entry in plan.entries:
            request_id = entry.request.request_id
            state = self._tracked.get(request_id)
            if state is None or entry.request.is_terminal:
                continue
            step.touched.pop(request_id, None)
            step.failed[request_id] = self._fail(state, message)

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
                log.exception("could not remove sequence %d of a failed request", seq_id)
