"""`DraftModelProposer`: `--speculative-mode small_draft`, a smaller model drafting greedily.

The draft model has its own runner and KV cache (on the same worker thread as the target). It
keeps one cache sequence per drafting choice and knows which tokens that sequence holds, so
each step it only pops what the target rejected and feeds what is new (usually the one or two
tokens the target kept beyond the draft); a choice it has not seen starts with its whole prompt.

Rules:

* Greedy drafts over the target's sampling vocabulary: a deterministic draft is what makes the
  core's verification exact (runtime/speculative.py).
* Best effort: when the draft cache has no room, the sequences of choices not drafting in this
  step go first; a choice that still does not fit gets no draft. A draft never fails a request.
* Every call's batch stays within the draft runner's `prefill_chunk_size` tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ..engine.request import Branch

log = logging.getLogger(__name__)

_SHORT = 4  # catch-ups up to this many tokens are fed one token per call


@attrs.define
class _Held:
    """What the draft cache holds for one branch: its first `confirmed` tokens (a branch's
    tokens only ever grow, so these never need checking again), then the drafts fed after
    them."""

    branch: Branch
    seq_id: int
    confirmed: int = 0
    drafted: list[int] = attrs.field(factory=list)

    @property
    def length(self) -> int:
        return self.confirmed + len(self.drafted)


class DraftModelProposer:
    def __init__(self, runner: Any, vocab: int, chunk: int) -> None:
        self.runner = runner
        self._vocab = vocab  # the target's sampling vocabulary
        self._chunk = chunk
        self._held: dict[int, _Held] = {}  # id(branch) -> its draft sequence
        self._free_ids = list(range(runner.max_num_sequence - 1, -1, -1))
        #: whether the last propose() fed a long catch-up (a prompt): that step's time says
        #: nothing about drafting's usual cost
        self.fed_prompt = False

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]:
        live = {id(b) for b in branches}
        for key in [k for k in self._held if k not in live]:
            self._drop(key)
        feeds: list[tuple[_Held, list[int]]] = []
        for b in branches:
            held = self._sync(b, live)
            if held is not None:
                feeds.append((held, list(b.token_slice(held.confirmed, b.num_tokens))))
        drafts: dict[int, list[int]] = {id(b): [] for b in branches}
        firsts = self._feed(feeds)
        active = []
        for (held, _), token in zip(feeds, firsts, strict=True):
            drafts[id(held.branch)].append(token)
            active.append(held)
        rounds = max(want, default=0)
        limits = {id(b): n for b, n in zip(branches, want, strict=True)}
        for _ in range(1, rounds):
            active = [h for h in active if len(drafts[id(h.branch)]) < limits[id(h.branch)]]
            active = [h for h in active if self._room(h, 1, live)]
            if not active:
                break
            last = [drafts[id(h.branch)][-1] for h in active]
            logits = self.runner.step([(h.seq_id, [t]) for h, t in zip(active, last, strict=True)])
            for h, t, row in zip(active, last, logits, strict=True):
                h.drafted.append(t)
                drafts[id(h.branch)].append(self._argmax(row))
        return [drafts[id(b)][:n] for b, n in zip(branches, want, strict=True)]

    def close(self) -> None:
        for key in list(self._held):
            self._drop(key)
        self.runner.close()

    # -- the draft cache ----------------------------------------------------------------------

    def _sync(self, branch: Branch, protected: set[int]) -> _Held | None:
        """The branch's draft sequence, popped back to the longest prefix it shares with the
        branch's tokens (minus the last, which is fed to get the first draft), or None when
        it does not fit."""
        held = self._held.get(id(branch))
        if held is None or held.branch is not branch:
            if held is not None:
                self._drop(id(branch))
            if not self._free_ids:
                return None
            held = _Held(branch, self._free_ids.pop())
            self.runner.add_sequence(held.seq_id)
            self._held[id(branch)] = held
        # Only the drafts can differ from the branch's tokens: compare them, never the history
        # (the last token is fed again in any case, to get the first draft from it).
        limit = branch.num_tokens - 1
        actual = branch.token_slice(held.confirmed, min(held.length, limit))
        keep = 0
        while keep < len(actual) and actual[keep] == held.drafted[keep]:
            keep += 1
        confirmed = min(held.confirmed + keep, limit)  # (a decoding branch grew since: no-op)
        if held.length > confirmed:
            self.runner.popn(held.seq_id, held.length - confirmed)
        held.confirmed, held.drafted = confirmed, []
        if not self._room(held, branch.num_tokens - held.confirmed, protected):
            self._drop(id(branch))
            return None
        return held

    def _room(self, held: _Held, num_tokens: int, protected: set[int]) -> bool:
        """Whether num_tokens more fit (context window; pages, evicting the sequences of
        branches not in `protected`, this call's)."""
        if held.length + num_tokens > self.runner.context_window_size:
            return False
        page = self.runner.page_size
        need = -(-(held.length + num_tokens) // page) - -(-held.length // page)
        while need > self.runner.free_pages():
            others = [k for k in self._held if k not in protected]
            if not others:
                return False
            self._drop(others[0])
        return True

    def _feed(self, feeds: list[tuple[_Held, list[int]]]) -> list[int]:
        """Append each feed's tokens; returns the greedy next token of each. A short catch-up
        (the usual one or two tokens) goes one token per call, batched across feeds: on a CPU a
        one-token step is far cheaper than a multi-token (prefill-path) one. A long one (a new
        choice's prompt) goes in chunks that fit a call."""
        out: list[int] = [0] * len(feeds)
        long = [(k, h, t) for k, (h, t) in enumerate(feeds) if len(t) > _SHORT]
        self.fed_prompt = bool(long)
        short = [(k, h, t) for k, (h, t) in enumerate(feeds) if len(t) <= _SHORT]
        for i in range(max((len(t) for _, _, t in short), default=0)):
            batch = [(k, h, [t[i]]) for k, h, t in short if i < len(t)]
            self._call(batch, out)
        pending = long
        while pending:
            batch, budget, rest = [], self._chunk, []
            for k, h, tokens in pending:
                take = min(len(tokens), budget)
                if take:
                    batch.append((k, h, tokens[:take]))
                    budget -= take
                if take < len(tokens):
                    rest.append((k, h, tokens[take:]))
            self._call(batch, out)
            pending = rest
        return out

    def _call(self, batch: list[tuple[int, _Held, list[int]]], out: list[int]) -> None:
        logits = self.runner.step([(h.seq_id, t) for _, h, t in batch])
        for (k, h, t), row in zip(batch, logits, strict=True):
            h.confirmed += len(t)  # a catch-up: the branch's own tokens
            out[k] = self._argmax(row)

    def _argmax(self, row: Any) -> int:
        return int(np.argmax(row[: self._vocab]))

    def _drop(self, key: int) -> None:
        held = self._held.pop(key)
        self.runner.remove_sequence(held.seq_id)
        self._free_ids.append(held.seq_id)
