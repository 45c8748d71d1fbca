"""`Speculator`: drafts tokens for decoding choices, so one model call can yield several tokens.

`--speculative-mode ngram` drafts by prompt lookup (engine/drafts.NgramProposer);
`small_draft` runs a second, smaller model (runtime/draft_model.py). EngineCore calls `draft`
after the scheduler planned a step and `record` after it verified a drafted entry.

Rules:

* Exact by construction: the core samples every drafted position as a plain decode would, from
  the target's logits with the choice's own state and random stream, and keeps tokens while they
  equal the draft (`take_drafted`). For a deterministic draft that is the rejection
  rule of Leviathan et al. (accept d with probability p(d), else a token from p without d), and it
  draws exactly the uniforms a plain decode draws: greedy or seeded, the output is the one
  speculation-free decoding gives (up to float differences between the two kernels' logits).
* Only decode entries of choices that have generated a token draft; a draft takes only spare
  room (engine/drafts.room_for_draft) and never more than the choice may still generate.
* Auto fallback: with more than `max_batch` decoding choices in a step nobody drafts (at large
  batch the verification of drafts costs more than it saves).
* Draft length: `spec_draft_length` > 0 fixes it; 0 lets `DraftPolicy` (runtime/spec_policy.py)
  pick, each step, the length with the best expected tokens per second from the measured step
  costs and acceptance rates, 0 included: speculation turns itself off where it does not pay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from ..config import SpeculativeMode
from ..engine.drafts import NgramProposer, decoding_branch, extend, room_for_draft
from ..engine.plan import BatchEntry, StepPlan
from ..engine.request import Branch
from ..engine.scheduler import Scheduler
from .sampler import SampleOutput
from .spec_policy import DraftPolicy


class Proposer(Protocol):
    """Drafts up to `want[i]` tokens to follow `branches[i]`'s tokens (may return fewer). A
    proposer whose proposals cost nothing (`cheap`, looked up with False as the default) is
    asked first, for as much as fits, and its unverified proposals are scored afterwards."""

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]: ...


@attrs.define
class NgramDrafter:
    """The Proposer of `--speculative-mode ngram`: prompt lookup over each choice's tokens."""

    lookup: NgramProposer = attrs.field(factory=NgramProposer)
    cheap = True

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]:
        return [
            self.lookup.propose(b.token_slice(0, b.num_tokens), k)
            for b, k in zip(branches, want, strict=True)
        ]


def take_drafted(
    entry: BatchEntry,
    sample_at: Callable[[int], SampleOutput | None],
    consume: Callable[[SampleOutput], bool],
) -> int:
    """Verify a drafted entry: sample its positions in order, each as a plain decode would
    (`sample_at(k)`: mask, bans, penalties and generator from the choice's state so far; None
    when the request failed), hand each token on (`consume`: False when that ended the choice),
    and go on while the token equals the draft: the first that differs, or the one after the
    last draft, ends the run. Returns how many drafted tokens were accepted."""
    draft = entry.token_ids[1:]
    accepted = 0
    for k in range(len(draft) + 1):
        out = sample_at(k)
        if out is None:
            break
        alive = consume(out)
        if k == len(draft) or int(out.token_ids[0]) != draft[k]:
            break
        accepted += 1  # (also when this token ended the choice: the draft had it right)
        if not alive:
            break
    return accepted


def matched_prefix(proposal: Sequence[int], actual: Sequence[int]) -> int:
    """How many tokens of `proposal` equal `actual`'s, from the first on."""
    n = 0
    while n < min(len(proposal), len(actual)) and proposal[n] == actual[n]:
        n += 1
    return n


@attrs.define
class SpecStats:
    """Counters for /metrics: drafts verified, tokens drafted, drafted tokens accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@attrs.define
class Speculator:
    """Drafts for an engine's decoding choices (see the module rules); one per EngineCore."""

    mode: SpeculativeMode
    proposer: Proposer
    draft_length: int = 0  # 0: adaptive (runtime/spec_policy.py)
    max_batch: int = 4
    policy: DraftPolicy = attrs.field(factory=DraftPolicy)
    stats: SpecStats = attrs.field(factory=SpecStats)
    #: what the last planned step was, to time it: (decoding choices, tokens), None: not all decode
    _pending: tuple[int, int] | None = None
    #: proposals not verified, checked against the tokens that followed: key -> (position, draft)
    _unverified: dict[tuple[str, int], tuple[int, list[int]]] = attrs.field(factory=dict)

    def draft(self, plan: StepPlan, scheduler: Scheduler) -> StepPlan:
        """The plan with draft tokens after the pending token of eligible decode entries."""
        decodes = [(k, e, b) for k, e in enumerate(plan.entries) if (b := decoding_branch(e))]
        all_decode = bool(decodes) and len(decodes) == len(plan.entries)
        self._pending = (len(decodes), plan.num_tokens) if all_decode else None
        if not decodes or len(decodes) > self.max_batch:
            return plan
        keys = [(e.request.request_id, b.index) for _, e, b in decodes]
        self.policy.forget(set(keys))
        budget = scheduler.prefill_chunk_size - plan.num_tokens
        room = [
            min(self.draft_length or self.policy.max_length,
                room_for_draft(scheduler.pool, e, budget, scheduler.context_window_size))
            for _, e, _ in decodes
        ]  # fmt: skip
        branches = [b for _, _, b in decodes]
        cheap = getattr(self.proposer, "cheap", False)
        if cheap:  # propose first: the proposals' lengths bound what can be drafted
            proposals = self.proposer.propose(branches, room)
            self._check_unverified(keys, branches)
            room = [len(p) for p in proposals]
        k = self.draft_length or self.policy.choose(keys, room, len(decodes), explore=not cheap)
        if not cheap:
            proposals = self.proposer.propose(branches, [min(k, r) for r in room]) if k else []
        if not k:
            if cheap:
                self._remember(keys, branches, proposals)
            return plan
        entries = list(plan.entries)
        for (i, e, _), tokens in zip(decodes, proposals, strict=True):
            # the free pages are shared: what is left after the entries extended before this one
            tokens = tokens[: min(k, budget, scheduler.pool.draftable_tokens(e.seq_id))]
            if tokens:
                entries[i] = extend(scheduler.pool, e, tokens)
                budget -= len(tokens)
        plan = attrs.evolve(plan, entries=tuple(entries))
        if all_decode:
            self._pending = (len(decodes), plan.num_tokens)
        return plan

    def step_done(self, seconds: float) -> None:
        """The wall time of the step `draft` planned last (kept for decode-only steps, not for
        one where the draft model first read a prompt)."""
        if self._pending is not None and not getattr(self.proposer, "fed_prompt", False):
            self.policy.observe_step(*self._pending, seconds)
            self._pending = None

    def record(self, entry: BatchEntry, accepted: int) -> None:
        """After the core verified `entry`'s draft: count it and learn from it."""
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += entry.num_draft
        self.stats.num_accepted_tokens += accepted
        key = (entry.request.request_id, entry.sample_branches[0])
        self.policy.observe_draft(key, entry.num_draft, accepted)

    def stats_fields(self) -> dict[str, object]:
        """The speculative fields of EngineStats."""
        return {
            "spec_mode": self.mode,
            "spec_num_drafts_total": self.stats.num_drafts,
            "spec_num_draft_tokens_total": self.stats.num_draft_tokens,
            "spec_num_accepted_tokens_total": self.stats.num_accepted_tokens,
        }

    def close(self) -> None:
        close = getattr(self.proposer, "close", None)
        if close is not None:
            close()

    def _remember(
        self, keys: list[tuple[str, int]], branches: list[Branch], proposals: list[list[int]]
    ) -> None:
        for key, b, p in zip(keys, branches, proposals, strict=True):
            if p:
                self._unverified[key] = (b.num_tokens, p)

    def _check_unverified(self, keys: list[tuple[str, int]], branches: list[Branch]) -> None:
        """Score the proposals made but not verified against the tokens that came after."""
        live = set(keys)
        for key in [k for k in self._unverified if k not in live]:
            del self._unverified[key]
        for key, b in zip(keys, branches, strict=True):
            if key not in self._unverified:
                continue
            at, proposal = self._unverified.pop(key)
            actual = b.token_slice(at, min(b.num_tokens, at + len(proposal)))
            self.policy.observe_draft(key, len(actual), matched_prefix(proposal, actual))
