"""Prefix cache: sequences of finished requests kept in the KV cache, found by a radix tree.

Rules (checked by tests/engine):

* A *cached sequence* is a runner sequence that no request owns any more: one per finished or
  aborted request (never after an engine error, a preemption or a "length" cap for lack of pages).
  Its tokens — prompt and generated tokens that were in the KV cache when the request ended — are
  one path of `RadixTree`; `PagePool` holds its pages like any other sequence's.
* At most `max_num_seqs` sequences are cached, and none is a prefix of another: a new sequence that
  a cached one already covers is dropped at once, and cached sequences it extends leave the cache.
* Cached pages are reclaimable: whoever needs pages or runner slots evicts cached sequences, least
  recently used first, before preempting any running request. A sequence forked from in the step
  being planned is *pinned* (the runner forks after the step's removals) and stays for that step.
* `match` never reuses the last token asked for: one token must be computed, for its logits. A hit
  of m tokens forks the cached sequence at m — full pages shared, a partial page copied, as the
  runner does — and makes it the most recently used.
* A sequence leaving the cache leaves the page pool at once and is returned to the caller, which
  removes it from the runner; `PrefixCache` never talks to the runner itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import attrs

from .pages import PagePool


@attrs.define(eq=False)
class _Node:
    key: tuple[int, ...]  # the tokens on the edge from the parent (empty only at the root)
    parent: _Node | None
    children: dict[int, _Node] = attrs.field(factory=dict)  # by the first token of their key
    seqs: set[int] = attrs.field(factory=set)  # sequences passing through or ending in the node
    ends: set[int] = attrs.field(factory=set)  # sequences whose last token is the key's last


def _common_prefix(key: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many leading tokens of key equal tokens[start:]."""
    end = start + len(key)
    if tuple(tokens[start:end]) == key:  # the common case, without a Python loop
        return len(key)
    n = 0
    for a, b in zip(key, tokens[start:end], strict=False):
        if a != b:
            break
        n += 1
    return n


class RadixTree:
    """Token sequences by id in a radix tree. Nodes split where sequences diverge or end, and merge
    back when a removal leaves a node with one child and no sequence ending in it."""

    def __init__(self) -> None:
        self._root = _Node(key=(), parent=None)
        self._tokens: dict[int, tuple[int, ...]] = {}
        self._end: dict[int, _Node] = {}  # the node each sequence ends in

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._tokens

    def __iter__(self) -> Iterator[int]:
        return iter(self._tokens)

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        return self._tokens[seq_id]

    def insert(self, seq_id: int, tokens: Sequence[int]) -> None:
        if seq_id in self._tokens or not tokens:
            raise ValueError(f"cannot insert sequence {seq_id} ({len(tokens)} tokens)")
        toks = tuple(tokens)
        node, i = self._root, 0
        while i < len(toks):
            child = node.children.get(toks[i])
            if child is None:
                child = node.children[toks[i]] = _Node(key=toks[i:], parent=node)
            else:
                common = _common_prefix(child.key, toks, i)
                if common < len(child.key):
                    child = self._split(child, common)
            child.seqs.add(seq_id)
            i += len(child.key)
            node = child
        node.ends.add(seq_id)
        self._tokens[seq_id] = toks
        self._end[seq_id] = node

    def remove(self, seq_id: int) -> None:
        node = self._end.pop(seq_id)
        del self._tokens[seq_id]
        node.ends.discard(seq_id)
        while node.parent is not None:
            node.seqs.discard(seq_id)
            parent = node.parent
            if not node.seqs:
                del parent.children[node.key[0]]
            elif len(node.children) == 1 and not node.ends:
                self._merge_into_child(node)
            node = parent

    def match(self, tokens: Sequence[int]) -> tuple[int, frozenset[int]]:
        """The longest common prefix of tokens with any sequence: (its length, the sequences that
        share it). (0, {}) when none shares even the first token."""
        node, i = self._root, 0
        seqs: set[int] = set()
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = _common_prefix(child.key, tokens, i)
            i += common
            seqs = child.seqs
            if common < len(child.key):
                break
            node = child
        return i, frozenset(seqs)

    def prefixes_of(self, tokens: Sequence[int]) -> list[int]:
        """The sequences whose tokens are a prefix of (or equal to) tokens."""
        node, i = self._root, 0
        found: list[int] = []
        while True:
            found.extend(node.ends)
            child = node.children.get(tokens[i]) if i < len(tokens) else None
            if child is None or _common_prefix(child.key, tokens, i) < len(child.key):
                return found
            i += len(child.key)
            node = child

    def check(self) -> None:
        """Assert the tree's structural invariants (for tests)."""
        stack: list[tuple[_Node, tuple[int, ...]]] = [(self._root, ())]
        while stack:
            node, path = stack.pop()
            child_seqs: set[int] = set()
            for first, child in node.children.items():
                assert child.parent is node and child.key and child.key[0] == first
                assert child.seqs, "an empty node was not pruned"
                child_seqs |= child.seqs
                stack.append((child, path + child.key))
            if node.parent is not None:
                assert node.seqs == node.ends | child_seqs
                assert node.ends or len(node.children) > 1, "a pass-through node was not merged"
            for seq_id in node.ends:
                assert self._end[seq_id] is node and self._tokens[seq_id] == path

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut node's key at `at`; returns the new upper node. The lower part keeps the object,
        so the end-node pointers of sequences ending in it stay valid."""
        assert node.parent is not None and 0 < at < len(node.key)
        upper = _Node(key=node.key[:at], parent=node.parent, seqs=set(node.seqs))
        node.parent.children[upper.key[0]] = upper
        node.key, node.parent = node.key[at:], upper
        upper.children[node.key[0]] = node
        return upper

    def _merge_into_child(self, node: _Node) -> None:
        """Replace a pass-through node by its only child (whose object, again, survives)."""
        assert node.parent is not None and not node.ends
        (child,) = node.children.values()
        child.key, child.parent = node.key + child.key, node.parent
        node.parent.children[child.key[0]] = child


@attrs.frozen
class PrefixMatch:
    """A hit: fork `seq_id` at `num_tokens` to reuse that many tokens."""

    seq_id: int
    num_tokens: int


class PrefixCache:
    """The cached sequences: radix tree, LRU order, budget and the page pool side of it."""

    def __init__(self, pool: PagePool, max_num_seqs: int) -> None:
        if max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive (leave the cache out to disable it)")
        self.max_num_seqs = max_num_seqs
        self.tree = RadixTree()
        self._pool = pool
        self._last_use: dict[int, int] = {}  # seq_id -> use counter; the smallest is the LRU
        self._clock = 0
        self._members_version = 0  # bumped when a sequence enters or leaves the cache
        self._cached_pages: tuple[tuple[int, int], int] | None = None  # (versions, count)
        self.pinned: set[int] = set()  # forked from in the step being planned: not evictable
        self.num_query_tokens_total = 0  # tokens looked up when a prefill started
        self.num_hit_tokens_total = 0  # of which reused from the cache
        self.num_evictions_total = 0  # sequences evicted for pages, slots or the budget

    def __len__(self) -> int:
        return len(self.tree)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.tree

    def seq_ids(self) -> list[int]:
        return list(self.tree)

    def match(self, tokens: Sequence[int]) -> PrefixMatch | None:
        """The longest cached prefix of tokens, short of the last token; None when empty.
        Pure: the LRU order changes only when the hit is used (`fork`)."""
        length, seqs = self.tree.match(tokens)
        length = min(length, len(tokens) - 1)
        if length <= 0:
            return None
        # Any sharer holds the prefix; the most recently used one is likeliest to stay cached.
        return PrefixMatch(max(seqs, key=self._last_use.__getitem__), length)

    def fork_prefix(
        self, tokens: Sequence[int], new_seq_id: Callable[[], int]
    ) -> tuple[tuple[int, int, int] | None, list[int]]:
        """Fork a new sequence (id from new_seq_id) from the longest cached prefix of tokens, if
        the pool then has room for one more token (evicting other sequences for it).

        Returns ((parent, child, fork_pos) or None, the evicted sequences). The parent is pinned
        until `unpin_all`; the caller forks the runner the same way.
        """
        match = self.match(tokens)
        if match is None:
            return None, []
        pos = match.num_tokens
        need = self._pool.pages_to_fork_at(pos) + (0 if pos % self._pool.page_size else 1)
        gone = self.reclaim(need, keep=match.seq_id)
        if self._pool.num_free < need:
            return None, gone
        child = new_seq_id()
        self._pool.fork(match.seq_id, child, pos)
        self._touch(match.seq_id)
        self.pinned.add(match.seq_id)
        return (match.seq_id, child, pos), gone

    def unpin_all(self) -> None:
        """A new step: the runner has done every fork planned so far."""
        self.pinned.clear()

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens_total += num_query_tokens
        self.num_hit_tokens_total += num_hit_tokens

    def insert(self, seq_id: int, tokens: Sequence[int]) -> list[int]:
        """Keep seq_id (holding exactly `tokens` in the pool) as a cached sequence. Returns the
        sequences that left the cache (seq_id itself when redundant), already out of the pool."""
        assert self._pool.length(seq_id) == len(tokens), "cached tokens must be the KV cache's"
        length, covering = self.tree.match(tokens)
        if length == len(tokens):  # a cached sequence already holds all of it
            self._touch(max(covering, key=self._last_use.__getitem__))
            self._pool.remove(seq_id)
            return [seq_id]
        gone = self.tree.prefixes_of(tokens)  # superseded: every lookup would match seq_id as far
        for old in gone:
            self._drop(old)
        self.tree.insert(seq_id, tokens)
        self._members_version += 1
        self._touch(seq_id)
        while len(self) > self.max_num_seqs:
            victim = self.evict_lru()
            assert victim is not None
            gone.append(victim)
        return gone

    def evict_lru(self, keep: int | None = None) -> int | None:
        """Drop the least recently used sequence that is neither pinned nor keep; returns it
        (None: nothing may go)."""
        candidates = [s for s in self._last_use if s not in self.pinned and s != keep]
        if not candidates:
            return None
        victim = min(candidates, key=self._last_use.__getitem__)
        self._drop(victim)
        self.num_evictions_total += 1
        return victim

    def reclaim(self, num_free_pages: int, keep: int | None = None) -> list[int]:
        """Evict (LRU first) until the pool has num_free_pages free pages or nothing may go;
        returns the evicted sequences."""
        gone = []
        while self._pool.num_free < num_free_pages:
            victim = self.evict_lru(keep)
            if victim is None:
                break
            gone.append(victim)
        return gone

    def shrink(self, max_num_seqs: int, tokens: Sequence[int] | None) -> list[int]:
        """Evict until at most max_num_seqs sequences are cached (pinned ones permitting), the one
        that tokens would fork from last. Returns the evicted sequences."""
        match = self.match(tokens) if tokens is not None else None
        keep = match.seq_id if match is not None else None
        gone: list[int] = []
        while len(self) > max_num_seqs:
            victim = self.evict_lru(keep)
            victim = self.evict_lru() if victim is None else victim
            if victim is None:
                break
            gone.append(victim)
        return gone

    def clear(self) -> list[int]:
        """Drop every cached sequence; returns them."""
        gone = list(self._last_use)
        for seq_id in gone:
            self._drop(seq_id)
        return gone

    def num_cached_pages(self) -> int:
        """Pages that only cached sequences hold (evicting them all would free exactly these).

        Read every engine step (for /metrics), so the count (a walk over every cached page:
        ~3 ms for 16k pages) is kept until the cache's members or the pool's sharing change."""
        versions = (self._members_version, self._pool.sharing_version)
        if self._cached_pages is None or self._cached_pages[0] != versions:
            refs = Counter(p for s in self._last_use for p in self._pool.pages_of(s))
            count = sum(1 for page, n in refs.items() if self._pool.refcount(page) == n)
            self._cached_pages = (versions, count)
        return self._cached_pages[1]

    def _touch(self, seq_id: int) -> None:
        self._clock += 1
        self._last_use[seq_id] = self._clock

    def _drop(self, seq_id: int) -> None:
        self._members_version += 1
        self.tree.remove(seq_id)
        del self._last_use[seq_id]
        self._pool.remove(seq_id)
