"""Per-request scheduling state: a table-driven state machine and the branches (choices) it owns.

Rules (the scheduler relies on every one of them):

* A request moves only along the edges of `_TRANSITIONS`:

      WAITING ──admit──▶ RUNNING ──preempt──▶ PREEMPTED ──admit──▶ RUNNING ...
      WAITING / RUNNING / PREEMPTED ──finish──▶ FINISHED   (all choices done: stop / length)
      WAITING / RUNNING / PREEMPTED ──abort───▶ ABORTED    (disconnect, deadline, shutdown, error)

  Any other (state, event) pair is a bug in the engine and raises `IllegalTransition`.
  FINISHED and ABORTED are terminal.
* A request has `n` branches, one per choice. Each live branch is one runner sequence (`seq_id`).
  Until the prompt has been computed once, only the *primary* branch (the first unfinished one)
  holds a sequence; the others are forked from it when its cursor reaches the end of the prompt, so
  the prompt is computed (and paged) once for all n choices.
* A branch's tokens are prompt + output (generated); `branch.num_cached` of them are in the
  runner's KV cache. Generated tokens are never dropped: preemption only resets `num_cached`
  to 0 (recompute).
* A branch is finished at most once; a finished branch holds no sequence.
* Prefix cache: a request gives at most one sequence to the cache (`gave_to_prefix_cache`), and
  `num_cached_prompt_tokens` is fixed by its first prefix lookup (None until then).
"""

from __future__ import annotations

import enum

import attrs

from ..errors import ContextLengthExceededError, EngineError
from .pages import pages_for
from .types import GenerationRequest


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


class RequestEvent(enum.Enum):
    ADMIT = "admit"
    PREEMPT = "preempt"
    FINISH = "finish"
    ABORT = "abort"


class IllegalTransition(EngineError):
    """An engine bug: a request was driven along an edge the state table does not have."""


class PromptTooLongError(ContextLengthExceededError, ValueError):
    """add() of a prompt the engine can never hold (the server is expected to check first)."""


@attrs.frozen
class EngineLimits:
    """The limits `max_new_tokens_for` checks, as a value the server can check requests against
    before submitting them (so a request the engine would refuse gets a 400, not a late error)."""

    context_window_size: int
    max_num_sequence: int
    total_pages: int
    page_size: int
    #: Tokens a sliding sequence holds at most (engine/pages.py), None without sliding mode.
    window_tokens: int | None = None

    def check(self, spec: GenerationRequest) -> int:
        return max_new_tokens_for(
            spec,
            context_window_size=self.context_window_size,
            max_num_sequence=self.max_num_sequence,
            total_pages=self.total_pages,
            page_size=self.page_size,
            window_tokens=self.window_tokens,
        )


def max_new_tokens_for(
    spec: GenerationRequest,
    *,
    context_window_size: int,
    max_num_sequence: int,
    total_pages: int,
    page_size: int,
    window_tokens: int | None = None,
) -> int:
    """Validate a request against the engine's limits; returns its max_tokens clipped to the
    window (<= 0: no room for a single token). Raises PromptTooLongError. A one-choice prompt
    of a sliding model needs only what its sliding sequence holds (`window_tokens`)."""
    num_prompt = len(spec.prompt_token_ids)
    n = spec.params.n
    if num_prompt == 0:
        raise PromptTooLongError("the prompt is empty", param="messages")
    if num_prompt > context_window_size:
        raise PromptTooLongError(
            f"prompt has {num_prompt} tokens, the context window is {context_window_size}",
            param="messages",
        )
    fork_pages = (n - 1) * (1 if num_prompt % page_size else 0)  # n - 1 copies of a partial page
    held = min(num_prompt, window_tokens) if window_tokens and n == 1 else num_prompt
    if pages_for(held, page_size) + fork_pages > total_pages:
        raise PromptTooLongError(
            f"prompt of {num_prompt} tokens (n={n}) does not fit the KV cache", param="n"
        )
    if not 1 <= n <= max_num_sequence:
        raise PromptTooLongError(
            f"n={n} is more than this server runs at once (max_num_sequence={max_num_sequence})",
            param="n",
            code="too_many_choices",
        )
    room = context_window_size - num_prompt
    max_tokens = spec.params.max_tokens
    return room if max_tokens is None else min(max_tokens, room)


_S = RequestState
_E = RequestEvent
_TRANSITIONS: dict[tuple[RequestState, RequestEvent], RequestState] = {
    (_S.WAITING, _E.ADMIT): _S.RUNNING,
    (_S.PREEMPTED, _E.ADMIT): _S.RUNNING,
    (_S.RUNNING, _E.PREEMPT): _S.PREEMPTED,
    (_S.WAITING, _E.FINISH): _S.FINISHED,
    (_S.RUNNING, _E.FINISH): _S.FINISHED,
    (_S.PREEMPTED, _E.FINISH): _S.FINISHED,
    (_S.WAITING, _E.ABORT): _S.ABORTED,
    (_S.RUNNING, _E.ABORT): _S.ABORTED,
    (_S.PREEMPTED, _E.ABORT): _S.ABORTED,
}

TERMINAL_STATES = frozenset({RequestState.FINISHED, RequestState.ABORTED})


@attrs.define
class Branch:
    """One choice of a request: its token history, its runner sequence and its cache cursor."""

    index: int
    prompt: tuple[int, ...]  # shared by all branches, never copied
    output: list[int] = attrs.field(factory=list)  # generated tokens (handed to the sampler as is)
    seq_id: int | None = None
    num_cached: int = 0  # tokens of prompt + output in the runner's KV cache
    finished: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.output)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens known but not yet in the KV cache (1 for a decoding branch)."""
        return self.num_tokens - self.num_cached

    def token_slice(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens [start, stop) of prompt + output, without concatenating the whole history."""
        num_prompt = len(self.prompt)
        if stop <= num_prompt:
            return self.prompt[start:stop]
        tail = tuple(self.output[max(0, start - num_prompt) : stop - num_prompt])
        return self.prompt[start:num_prompt] + tail if start < num_prompt else tail


@attrs.define(eq=False)
class Request:
    """Scheduling state of one GenerationRequest (identity semantics: one object per request)."""

    spec: GenerationRequest
    max_new_tokens: int  # max_tokens clipped to the context window
    branches: list[Branch]
    state: RequestState = RequestState.WAITING
    num_preemptions: int = 0
    num_cached_prompt_tokens: int | None = None  # prompt tokens reused from the prefix cache
    gave_to_prefix_cache: bool = False

    @classmethod
    def create(cls, spec: GenerationRequest, max_new_tokens: int) -> Request:
        prompt = tuple(spec.prompt_token_ids)
        branches = [Branch(index=i, prompt=prompt) for i in range(spec.params.n)]
        return cls(spec=spec, max_new_tokens=max_new_tokens, branches=branches)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.spec.prompt_token_ids)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def transition(self, event: RequestEvent) -> None:
        """Move along one edge of the state table; an edge it lacks is an engine bug."""
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(
                f"request {self.request_id}: {event.value} is illegal in state {self.state.value}"
            ) from None

    def unfinished(self) -> list[Branch]:
        return [b for b in self.branches if not b.finished]

    def live_branches(self) -> list[Branch]:
        """Branches holding a runner sequence."""
        return [b for b in self.branches if b.seq_id is not None]

    def primary(self) -> Branch | None:
        """The branch that computes the prompt for all of them (first unfinished one)."""
        for b in self.branches:
            if not b.finished:
                return b
        return None

    def unforked(self) -> list[Branch]:
        """Unfinished branches still waiting to be forked from the primary."""
        return [b for b in self.branches if not b.finished and b.seq_id is None]

    @property
    def all_finished(self) -> bool:
        return all(b.finished for b in self.branches)
