"""Page accounting that mirrors the runner's paged KV cache, so the scheduler plans without asking.

Rules (the same ones `ModelRunner` documents, and the ones a test checks against `free_pages()`):

* The cache has `total_pages` pages of `page_size` tokens. A page is free iff its refcount is 0;
  `num_free + num_used == total_pages` at all times.
* A sequence of L tokens holds exactly ceil(L / page_size) page references, in order.
* `fork(parent, child, pos)` gives the child the parent's first floor(pos / page_size) pages by
  reference (refcount + 1) and, when pos is not page aligned, a fresh copy of the partial page.
  So a page shared by several sequences is always full, and appending never writes into it — except
  after `pop`, where the now-partial shared last page is copied on the next append (copy-on-write).
* `remove` drops the sequence's references; pages whose refcount reaches 0 become free.
* Sliding windows (`PagePool(window=W, sink=S)`, a model whose every layer slides; W counts
  all tokens kept, the S sinks included): a sequence added `windowable` (never one forked, nor
  one that will be forked) keeps at most W tokens, its first S and its last W - S, as TVM's
  cache does once the sequence is put in sliding mode. An
  append that takes such a sequence past W puts it there (`append` returns True: the runner
  must be told before the step) and from then on every append releases the pages wholly before
  the window, by the cache's own arithmetic (`_slide`: the layout is S sink tokens, then the
  window from column `offset` of the page list). A sliding sequence is never forked or popped,
  and its length here is what the cache holds (at most W), not the tokens it has seen.

Page ids here are our own bookkeeping: only the counts must agree with the runner.
"""

from __future__ import annotations

import heapq

import attrs

from ..errors import EngineError


class OutOfPages(EngineError):
    """An engine bug: the scheduler planned more pages than were free."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages a sequence of num_tokens tokens holds: ceil(num_tokens / page_size)."""
    return -(-num_tokens // page_size)


@attrs.define
class _Seq:
    length: int = 0
    pages: list[int] = attrs.field(factory=list)
    windowable: bool = False  # may enter sliding mode (module rules)
    sliding: bool = False  # in sliding mode: the cache releases what leaves the window
    sink: int = 0  # the cache's sink_length (set at the first slide)
    offset: int = 0  # the cache's sliding_window_offset: the window's first page-list column


@attrs.frozen
class _Slid:
    """A sequence's state after an append that slides (length, sink, offset, pages freed)."""

    length: int
    sink: int
    offset: int
    freed: int


@attrs.define(init=False)
class PagePool:
    """Refcounted pages per sequence; see the module rules."""

    page_size: int
    total_pages: int
    _refcount: list[int]
    _free: list[int]
    _seqs: dict[int, _Seq]
    #: Bumped whenever a page gains or loses a reference other than by a fresh allocation (fork,
    #: remove, pop, copy-on-write): who shares which page can only have changed when it moved.
    sharing_version: int

    #: The cache's sliding window (tokens kept) and attention sink size; None: no sliding mode.
    window: int | None
    sink: int

    def __init__(
        self, total_pages: int, page_size: int, *, window: int | None = None, sink: int = 0
    ) -> None:
        if total_pages <= 0 or page_size <= 0:
            raise ValueError("total_pages and page_size must be positive")
        if window is not None and not 0 <= sink < window:
            raise ValueError("the attention sink must be shorter than the window")
        self.window, self.sink = window, sink
        self.page_size = page_size
        self.total_pages = total_pages
        self._refcount = [0] * total_pages
        # Pop from the end: lowest ids are handed out first (only to make dumps readable).
        self._free = list(range(total_pages - 1, -1, -1))
        self._seqs = {}
        self.sharing_version = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.total_pages - len(self._free)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def length(self, seq_id: int) -> int:
        return self._seqs[seq_id].length

    def pages_of(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._seqs[seq_id].pages)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def is_sliding(self, seq_id: int) -> bool:
        """Whether seq_id is in sliding mode (it has released or will release its first pages)."""
        return self._seqs[seq_id].sliding

    def pages_to_append(self, seq_id: int, num_tokens: int) -> int:
        """Free pages that appending num_tokens to seq_id would consume (negative: release)."""
        seq = self._seqs[seq_id]
        slid = self._slide(seq, num_tokens)
        if slid is not None:
            return self._slid_pages(seq, num_tokens) - slid.freed - len(seq.pages)
        need = pages_for(seq.length + num_tokens, self.page_size) - len(seq.pages)
        if num_tokens > 0 and seq.length % self.page_size and self._refcount[seq.pages[-1]] > 1:
            need += 1  # copy-on-write of a shared partial page (only after pop)
        return need

    def appendable_tokens(self, seq_id: int | None, num_free: int | None = None) -> int:
        """Tokens seq_id (None: a new sequence) can take with num_free (default: all) free pages."""
        free = len(self._free) if num_free is None else num_free
        if seq_id is None:
            return free * self.page_size
        seq = self._seqs[seq_id]
        if seq.windowable and self.window is not None:
            return self._appendable_windowed(seq_id, free)
        pages = len(seq.pages) + free
        if seq.length % self.page_size and self._refcount[seq.pages[-1]] > 1:
            pages -= 1  # the first append spends a page on copy-on-write
        return max(0, pages * self.page_size - seq.length)

    def _appendable_windowed(self, seq_id: int, free: int) -> int:
        """appendable_tokens of a windowable sequence: what it holds is bounded by the window, so
        with room for its largest layout (W + 2 pages) any number; else the longest append
        whose every shorter append fits too (page counts wobble with the window's alignment)."""
        seq, size, page = self._seqs[seq_id], self.window or 0, self.page_size
        if pages_for(size, page) + 2 <= free + len(seq.pages):
            return 1 << 30
        n = 0
        while n < size + 2 * page and self.pages_to_append(seq_id, n + 1) <= free:
            n += 1
        return n

    def draftable_tokens(self, seq_id: int) -> int:
        """Tokens that may be appended to seq_id and popped again (speculative drafts): none
        past the window of a windowable sequence, whose cache cannot pop what it slid."""
        seq = self._seqs[seq_id]
        room = self.appendable_tokens(seq_id)
        if seq.windowable and self.window is not None:
            room = 0 if seq.sliding else min(room, max(0, self.window - seq.length))
        return room

    def pages_to_fork(self, parent_id: int, fork_pos: int = -1) -> int:
        """Free pages a fork at fork_pos consumes: one copy of the partial page, if any."""
        pos = self._seqs[parent_id].length if fork_pos < 0 else fork_pos
        return self.pages_to_fork_at(pos)

    def pages_to_fork_at(self, fork_pos: int) -> int:
        """Free pages a fork of a fork_pos-token prefix consumes."""
        return 1 if fork_pos % self.page_size else 0

    def add(self, seq_id: int, *, windowable: bool = False) -> None:
        """A new empty sequence; `windowable`: it may enter sliding mode (module rules)."""
        if seq_id in self._seqs:
            raise EngineError(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = _Seq(windowable=windowable and self.window is not None)

    def remove(self, seq_id: int) -> None:
        for page in self._seqs.pop(seq_id).pages:
            self._decref(page)

    def append(self, seq_id: int, num_tokens: int) -> bool:
        """Append num_tokens; True when this puts seq_id in sliding mode (tell the runner)."""
        seq = self._seqs[seq_id]
        if self.pages_to_append(seq_id, num_tokens) > len(self._free):
            raise OutOfPages(f"sequence {seq_id}: no pages for {num_tokens} more tokens")
        slid = self._slide(seq, num_tokens)
        if slid is not None:
            return self._append_sliding(seq, num_tokens, slid)
        if num_tokens > 0 and seq.length % self.page_size and self._refcount[seq.pages[-1]] > 1:
            self._decref(seq.pages[-1])
            seq.pages[-1] = self._alloc()
        seq.length += num_tokens
        while len(seq.pages) < pages_for(seq.length, self.page_size):
            seq.pages.append(self._alloc())
        return False

    # -- sliding mode (TVM's ReserveAppendLengthInSeq and SlideWindowForSequence) ---------------
    def _slide(self, seq: _Seq, num_tokens: int) -> _Slid | None:
        """The state after appending num_tokens, if that slides the window; else None."""
        if self.window is None or not seq.windowable or seq.length + num_tokens <= self.window:
            return None
        sink, offset = seq.sink, seq.offset
        if self.sink > 0 and sink == 0:  # the first slide pins the sinks
            sink = offset = self.sink
        sink_pages = pages_for(sink, self.page_size)
        page, start = divmod(offset + seq.length + num_tokens - self.window, self.page_size)
        freed = max(0, page - sink_pages)
        return _Slid(self.window, sink, (page - freed) * self.page_size + start, freed)

    def _slid_pages(self, seq: _Seq, num_tokens: int) -> int:
        """Pages the sequence holds after the append's reservation, before the slide."""
        return pages_for(seq.offset + seq.length + num_tokens - seq.sink, self.page_size)

    def _append_sliding(self, seq: _Seq, num_tokens: int, slid: _Slid) -> bool:
        started = not seq.sliding
        while len(seq.pages) < self._slid_pages(seq, num_tokens):
            seq.pages.append(self._alloc() if self._free else -1)  # -1: the cache's temp page
        sink_pages = pages_for(slid.sink, self.page_size)
        for page in seq.pages[sink_pages : sink_pages + slid.freed]:
            if page >= 0:
                self._decref(page)
        del seq.pages[sink_pages : sink_pages + slid.freed]
        seq.pages = [self._alloc() if page < 0 else page for page in seq.pages]
        seq.length, seq.sink, seq.offset, seq.sliding = slid.length, slid.sink, slid.offset, True
        assert len(seq.pages) == pages_for(seq.offset + seq.length - seq.sink, self.page_size)
        return started

    def fork(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        parent = self._seqs[parent_id]
        if parent.sliding:
            raise EngineError(f"sequence {parent_id} slides its window: it cannot be forked")
        pos = parent.length if fork_pos < 0 else fork_pos
        if not 0 <= pos <= parent.length:
            raise EngineError(f"fork position {pos} outside sequence {parent_id}")
        if child_id in self._seqs:
            raise EngineError(f"sequence {child_id} already exists")
        if self.pages_to_fork(parent_id, pos) > len(self._free):
            raise OutOfPages(f"no page to fork sequence {parent_id}")
        num_full = pos // self.page_size
        shared = parent.pages[:num_full]
        for page in shared:
            self._refcount[page] += 1
        self.sharing_version += 1
        child = _Seq(length=pos, pages=list(shared))
        if pos % self.page_size:
            child.pages.append(self._alloc())
        self._seqs[child_id] = child

    def pop(self, seq_id: int, num_tokens: int) -> None:
        seq = self._seqs[seq_id]
        if seq.sliding:
            raise EngineError(f"sequence {seq_id} slides its window: it cannot be popped")
        if not 0 <= num_tokens <= seq.length:
            raise EngineError(f"cannot pop {num_tokens} tokens of sequence {seq_id}")
        seq.length -= num_tokens
        keep = pages_for(seq.length, self.page_size)
        for page in seq.pages[keep:]:
            self._decref(page)
        del seq.pages[keep:]

    def _alloc(self) -> int:
        if not self._free:
            raise OutOfPages("KV cache pool exhausted")
        page = self._free.pop()
        self._refcount[page] = 1
        return page

    def _decref(self, page: int) -> None:
        self.sharing_version += 1
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._free.append(page)


@attrs.define
class SeqIds:
    """Runner sequence ids: each held by one sequence at a time; freed ids are reused smallest
    first, so ids stay below the number of sequences ever alive at once."""

    _free: list[int] = attrs.field(factory=list)  # a heap
    _next: int = 0

    def take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._next += 1
        return self._next - 1

    def give_back(self, seq_ids: list[int]) -> list[int]:
        """Make seq_ids (out of the pool) reusable; returns them."""
        for seq_id in seq_ids:
            heapq.heappush(self._free, seq_id)
        return seq_ids
