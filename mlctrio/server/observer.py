"""Feeds metrics and the event trace from what the engine bridge delivers.

Runs on the trio side inside AsyncEngine._deliver, so every method must be cheap and never raise.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import attrs

from ..engine.types import GenerationRequest, RequestOutput
from ..metrics import Metrics


@attrs.define
class _Track:
    arrival: float
    tid: int
    prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    reasons: set[str] = attrs.field(factory=set)


@attrs.define
class EventTrace:
    """A bounded ring buffer of Chrome-trace events: one process per served model (`process()`),
    one track per request."""

    capacity: int
    _events: collections.deque[dict[str, Any]] = attrs.field(init=False)
    _origin: float = attrs.field(factory=time.monotonic)
    _processes: dict[int, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._events = collections.deque(maxlen=self.capacity)

    def process(self, model_name: str) -> int:
        """A new process id for a model's events, named after it in the trace."""
        pid = len(self._processes) + 1
        self._processes[pid] = model_name
        return pid

    def add(
        self, name: str, tid: int, ts: float, request_id: str, *, pid: int = 1, **args: Any
    ) -> None:
        self._events.append(
            {
                "name": name,
                "cat": "request",
                "ph": "i",
                "s": "t",
                "ts": round((ts - self._origin) * 1e6, 1),
                "pid": pid,
                "tid": tid,
                "args": {"request_id": request_id, **args},
            }
        )

    def dump(self) -> dict[str, Any]:
        names: dict[tuple[int, int], str] = {}
        for ev in self._events:
            names.setdefault((ev["pid"], ev["tid"]), ev["args"]["request_id"])
        meta = [
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": model}}
            for pid, model in self._processes.items()
        ]
        meta += [
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": rid}}
            for (pid, tid), rid in names.items()
        ]
        return {"traceEvents": meta + list(self._events), "displayTimeUnit": "ms"}


@attrs.define
class EngineObserver:
    """One engine's observer: its model's metrics children, its process in the shared trace."""

    metrics: Metrics
    trace: EventTrace | None = None
    clock: Any = time.monotonic
    pid: int = 1  # the model's process in the trace (EventTrace.process)
    _tracks: dict[str, _Track] = attrs.field(factory=dict)
    _next_tid: int = 1

    def on_submit(self, request: GenerationRequest) -> None:
        now = self.clock()
        arrival = request.arrival_time or now
        self._tracks[request.request_id] = _Track(
            arrival, self._next_tid, len(request.prompt_token_ids)
        )
        if self.trace is not None:
            self._trace("received", self._next_tid, arrival, request.request_id)
            # Tokenization and template rendering end right before submission.
            self._trace("tokenized", self._next_tid, now, request.request_id)
            self._trace(
                "queued",
                self._next_tid,
                now,
                request.request_id,
                prompt_tokens=len(request.prompt_token_ids),
            )
        self._next_tid += 1

    def on_output(self, output: RequestOutput, abort_reason: str | None) -> None:
        track = self._tracks.get(output.request_id)
        if track is None:
            return
        now = self.clock()
        m = self.metrics
        num_new = 0
        for d in output.deltas:
            num_new += len(d.token_ids)
            if d.finish_reason:
                track.reasons.add(d.finish_reason)
        if num_new:
            if track.first_token is None:
                track.first_token = now
                m.time_to_first_token.observe(now - track.arrival)
                if self.trace is not None:
                    self._trace("first_token", track.tid, now, output.request_id)
            elif track.last_token is not None:
                m.inter_token_latency.observe(now - track.last_token)
            track.last_token = now
            track.num_tokens += num_new
            m.generation_tokens.inc(num_new)
            if self.trace is not None:
                self._trace("step", track.tid, now, output.request_id, tokens=num_new)
        if not output.finished:
            return
        del self._tracks[output.request_id]
        m.prompt_tokens.inc(output.usage.prompt_tokens)
        m.request_prompt_tokens.observe(output.usage.prompt_tokens)
        m.request_generation_tokens.observe(output.usage.completion_tokens)
        m.e2e_request_latency.observe(now - track.arrival)
        reasons = track.reasons
        if output.error is not None:
            m.request_finished("error")
            reason = "error"
        elif "abort" in reasons:
            reason = abort_reason or "abort"
            m.request_aborted(reason)
        else:
            reason = sorted(reasons)[0] if reasons else "stop"
            m.request_finished(reason)
        if self.trace is not None:
            spec = {}
            if output.spec_counts is not None:  # accepted length: drafted tokens kept per draft
                drafts, drafted, accepted = output.spec_counts
                spec = {"spec_drafts": drafts, "spec_draft_tokens": drafted,
                        "spec_accepted_tokens": accepted,
                        "spec_mean_accepted_length": round(accepted / drafts, 3)}  # fmt: skip
            self._trace("finished", track.tid, now, output.request_id, reason=reason, **spec)

    def on_events(self, events: Any) -> None:
        """Engine-side events: prefill_start ends the queue time; both go to the trace."""
        for request_id, name, ts in events:
            track = self._tracks.get(request_id)
            if track is None:
                continue
            if name == "prefill_start":
                self.metrics.request_queue_time.observe(max(0.0, ts - track.arrival))
            if self.trace is not None:
                self._trace(name, track.tid, ts, request_id)

    def on_stats(self, stats: Any) -> None:
        self.metrics.observe_engine(stats)

    def _trace(self, name: str, tid: int, ts: float, request_id: str, **args: Any) -> None:
        assert self.trace is not None
        self.trace.add(name, tid, ts, request_id, pid=self.pid, **args)
