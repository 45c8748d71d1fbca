"""Speculative decoding's bookkeeping: drafted tokens in a step plan, and the KV they leave.

Sans-IO, like the rest of engine/: token ids and page counts only. The runtime's speculator
(runtime/speculative.py) asks a proposer for draft tokens, and these functions put them into the
plan and take the rejected ones back out.

Rules:

* A decode entry appends the branch's one pending token. `extend` appends up to k drafted tokens
  after it (`BatchEntry.num_draft`), as far as free pages, the step's token budget, the context
  window and the branch's remaining `max_new_tokens` allow; it never preempts, evicts or waits
  (a draft is an optimisation: it takes only what is spare). The page mirror grows with it.
* After the step the branch keeps, in the KV cache, every token but its last (the same invariant
  as a plain decode: `num_pending == 1`); `trim` pops the rest. Whatever was accepted, rejected or
  cut by a stop, the cache then holds exactly the branch's tokens minus one, so a finished branch
  goes to the prefix cache with KV that matches its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .pages import PagePool
from .plan import BatchEntry
from .request import Branch


def decoding_branch(entry: BatchEntry) -> Branch | None:
    """The branch a one-token decode entry samples for, or None (a prefill, a fork point)."""
    if len(entry.token_ids) != 1 or len(entry.sample_branches) != 1 or entry.num_draft:
        return None
    branch = entry.request.branches[entry.sample_branches[0]]
    if branch.seq_id != entry.seq_id or branch.num_generated == 0:
        return None  # the first token comes from the prompt's last position
    return branch


def room_for_draft(pool: PagePool, entry: BatchEntry, budget: int, context_window_size: int) -> int:
    """Draft tokens the entry can take: bounded by the token budget, the free pages, the context
    window and the tokens the branch may still generate (the bonus token counts too)."""
    branch = decoding_branch(entry)
    if branch is None:
        return 0
    req = entry.request
    left = req.max_new_tokens - branch.num_generated - 1
    window = context_window_size - (entry.start + 1)
    pages = pool.draftable_tokens(entry.seq_id)  # beyond the pending token, already planned
    return max(0, min(budget, left, window, pages))


def extend(pool: PagePool, entry: BatchEntry, draft: Sequence[int]) -> BatchEntry:
    """The entry with `draft` appended (the caller sized it with `room_for_draft`)."""
    if not draft:
        return entry
    pool.append(entry.seq_id, len(draft))
    branch = entry.request.branches[entry.sample_branches[0]]
    branch.num_cached += len(draft)
    return attrs.evolve(entry, token_ids=(*entry.token_ids, *draft), num_draft=len(draft))


def trim(pool: PagePool, branch: Branch) -> tuple[int, int] | None:
    """Pop what the branch's cache holds beyond its tokens minus one; returns (seq_id, n) for
    the runner, or None when there is nothing to pop."""
    if branch.seq_id is None:
        return None
    extra = branch.num_cached - (branch.num_tokens - 1)
    if extra <= 0:
        return None
    pool.pop(branch.seq_id, extra)
    branch.num_cached -= extra
    return branch.seq_id, extra


@attrs.define
class NgramProposer:
    """Prompt lookup (vLLM's and llama.cpp's n-gram drafting): find the latest earlier
    occurrence of the sequence's last n tokens (n from `max_n` down to `min_n`) and propose the
    tokens that followed it."""

    min_n: int = 2
    max_n: int = 4

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(tokens) <= self.min_n:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        size = arr.size
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            # windows start at 0 .. size - 1 - n: every occurrence but the suffix itself
            windows = sliding_window_view(arr[: size - 1], n)
            hits = np.flatnonzero((windows == arr[size - n :]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return [int(t) for t in arr[start : start + k]]
        return []
