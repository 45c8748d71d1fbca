"""How the scheduler uses the prefix cache (engine/prefix_cache.py): a mixin of `Scheduler`.

Rules (the scheduler's docstring has the whole picture):

* Only a seq-less primary branch forks a cached prefix, and only of its first `target` tokens
  (the prompt when siblings will fork from it); the fork is a `cache_forks` entry of the plan
  and is undone when the request does not start after all.
* Cached sequences give back pages (`_reclaim`) and runner slots (`_free_slots`) before anything
  is preempted or a request is kept waiting; the one a request would fork from goes last.
* A request that only a sliding sequence can finish (`_outgrows_cache`) takes no cached prefix.
"""

from __future__ import annotations

from .pages import PagePool, SeqIds, pages_for
from .plan import _Draft
from .prefix_cache import PrefixCache
from .request import Branch, Request


class PrefixCacheUse:
    """The scheduler's prefix-cache methods; `Scheduler` provides the attributes below."""

    pool: PagePool
    prefix_cache: PrefixCache | None
    max_num_sequence: int
    _ids: SeqIds

    def _outgrows_cache(self, req: Request) -> bool:
        """Whether req could not be held whole, so that only a sliding sequence can finish it: a
        fork of a cached prefix never slides (engine/pages.py), so such a request takes none."""
        if self.pool.window is None:
            return False
        longest = req.num_prompt_tokens + req.max_new_tokens
        return pages_for(longest, self.pool.page_size) > self.pool.total_pages

    def _prefill_target(self, req: Request) -> tuple[Branch, list[Branch], int]:
        """(primary, its unforked siblings, the tokens the primary computes before they fork)."""
        primary = req.primary()
        assert primary is not None, "a queued request has an unfinished choice"
        siblings = [b for b in req.unforked() if b is not primary]
        return primary, siblings, primary.num_prompt_tokens if siblings else primary.num_tokens

    def _fork_cached_prefix(self, draft: _Draft, primary: Branch, target: int) -> int:
        """Give the seq-less primary a fork of the longest cached prefix of its first target
        tokens (room permitting); returns the tokens reused."""
        assert self.prefix_cache is not None
        tokens = primary.token_slice(0, target)
        fork, gone = self.prefix_cache.fork_prefix(tokens, self._ids.take)
        draft.removed.extend(self._ids.give_back(gone))
        if fork is None:
            return 0
        draft.cache_forks.append(fork)
        _, primary.seq_id, primary.num_cached = fork
        return primary.num_cached

    def _undo_cache_fork(self, draft: _Draft, primary: Branch) -> None:
        _, child, _ = draft.cache_forks.pop()
        assert child == primary.seq_id, "the undone fork is the last one planned"
        self.pool.remove(child)
        self._ids.give_back([child])
        primary.seq_id, primary.num_cached = None, 0

    def _record_lookup(self, req: Request, num_query: int, num_hit: int) -> None:
        assert self.prefix_cache is not None
        self.prefix_cache.record_lookup(num_query, num_hit)
        if req.num_cached_prompt_tokens is None:  # usage reports the first admission's reuse
            req.num_cached_prompt_tokens = min(num_hit, req.num_prompt_tokens)

    def _reclaim(self, draft: _Draft, num_free_pages: int) -> None:
        """Evict cached sequences (LRU, never pinned ones) until num_free_pages are free."""
        if self.prefix_cache is not None and self.pool.num_free < num_free_pages:
            draft.removed.extend(self._ids.give_back(self.prefix_cache.reclaim(num_free_pages)))

    def _free_slots(self, draft: _Draft, req: Request, seats: int) -> bool:
        """Evict cached sequences until they and `seats` fit the runner's sequence slots, the one
        req would fork from last. False when they cannot (pinned ones) fit."""
        cache = self.prefix_cache
        if cache is None or seats + len(cache) <= self.max_num_sequence:
            return True
        primary, _, target = self._prefill_target(req)
        tokens = primary.token_slice(0, target) if primary.seq_id is None else None
        draft.removed.extend(
            self._ids.give_back(cache.shrink(self.max_num_sequence - seats, tokens))
        )
        return seats + len(cache) <= self.max_num_sequence
