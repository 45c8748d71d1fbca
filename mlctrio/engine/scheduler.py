"""The continuous-batching scheduler: which sequences run in the next step, with how many tokens.

Rules (each is checked by tests/engine):

* One `schedule()` call plans one step and updates the page mirror (`PagePool`) and the branch
  cursors as if the plan had run; the caller executes `removed_seq_ids`, `added_seq_ids`,
  `cache_forks`, the batch and its forks on the runner, in that order, after which `pool` equals
  the runner's cache.
* Aborts take effect at the next step boundary (the start of `schedule()`) and free their pages.
* Decodes first: every decoding sequence gets one token per step, so a long prompt never stalls
  running streams. When a decode needs a page and none is free, the most recently started request
  is preempted (pages freed, cursors reset, generated tokens kept) and put at the head of the queue.
  A request that cannot fit even alone ends its page-starved choices with "length".
* Then prefills (new prompts, continued chunks, recompute after preemption), FIFO, chunked into the
  rest of the step's token budget (`prefill_chunk_size` tokens per step in all; at most
  `prefill_tokens_while_decoding` prompt tokens in a step that also decodes, so that a long prompt
  or an embedding burst slows the running streams by a bounded step time), bounded by the free
  pages and by `max_num_sequence` seats (a request reserves one seat per unfinished choice). A
  running prefill that gets no page preempts newer requests that are not in the batch, so partial
  prefills can never wait on each other forever. Nothing is admitted in a step that preempted.
* n > 1: the primary branch computes the prompt once; its siblings are forked from it right after
  the step that completes the prompt, and all n sample their first token from that same row.
* Ids: a runner sequence id is held by exactly one live branch or cached sequence; freed ids are
  reused smallest first.
* Prefix cache (engine/prefix_cache.py; None when disabled): a primary branch that starts its
  prefill without a sequence forks one from the longest cached prefix of its tokens
  (`cache_forks`, run after the adds and before the step) and prefills only the rest. Cached
  sequences hold pages and runner slots: both are reclaimed from the cache (LRU) before anything
  is preempted or a request is kept waiting, so `reserved seats + cached sequences <=
  max_num_sequence` at every step boundary. A finished or aborted request leaves one of its
  sequences in the cache instead of removing it. A request that needs the model's output at every
  prompt position (prompt logprobs, embeddings) never starts from a cached prefix.
* Sliding windows (engine/pages.py; a model whose every layer slides): the primary branch of a
  one-choice request gets a windowable sequence, which the step that takes it past the window
  puts in the cache's sliding mode (`sliding_seq_ids`, run before the step). A sliding sequence
  is never given to the prefix cache, and a request the cache could not hold whole takes no
  cached prefix (a fork cannot slide).
"""

from __future__ import annotations

import collections

import attrs

from ..errors import EngineError
from .pages import PagePool, SeqIds
from .plan import BatchEntry as BatchEntry  # re-exported: the plan types live in engine/plan.py
from .plan import StepPlan as StepPlan
from .plan import _Draft
from .prefix_cache import PrefixCache
from .request import Branch, EngineLimits, Request, RequestEvent, RequestState
from .request import PromptTooLongError as PromptTooLongError  # re-exported: add() raises it
from .scheduler_prefix import PrefixCacheUse
from .types import GenerationRequest


@attrs.define(init=False)
class Scheduler(PrefixCacheUse):
    """Plans steps over a page budget; see the module rules."""

    pool: PagePool
    max_num_sequence: int
    prefill_chunk_size: int
    prefill_tokens_while_decoding: int | None
    context_window_size: int
    waiting: collections.deque[Request]
    running: list[Request]  # in the order they (re)started: most recent last
    num_preemptions_total: int
    prefix_cache: PrefixCache | None
    _requests: dict[str, Request]
    _pending_aborts: dict[str, str]
    _ids: SeqIds

    def __init__(
        self,
        *,
        total_pages: int,
        page_size: int,
        max_num_sequence: int,
        prefill_chunk_size: int,
        context_window_size: int,
        prefix_cache_max_num_seqs: int = 0,
        prefill_tokens_while_decoding: int | None = None,
        kv_window: tuple[int, int] | None = None,
    ) -> None:
        """kv_window: (tokens kept, sink) of a cache that releases what leaves a sliding window
        (engine/pages.py); None: it holds every token."""
        window, sink = kv_window or (None, 0)
        self.pool = PagePool(total_pages, page_size, window=window, sink=sink)
        self.prefix_cache = (
            PrefixCache(self.pool, prefix_cache_max_num_seqs) if prefix_cache_max_num_seqs else None
        )
        self.max_num_sequence = max_num_sequence
        self.prefill_chunk_size = prefill_chunk_size
        self.prefill_tokens_while_decoding = prefill_tokens_while_decoding
        self.context_window_size = context_window_size
        self.waiting = collections.deque()
        self.running = []
        self.num_preemptions_total = 0
        self._requests = {}
        self._pending_aborts = {}
        self._ids = SeqIds()

    # -- requests in and out ------------------------------------------------------------------

    @property
    def limits(self) -> EngineLimits:
        """What add() checks, for checking requests before they are submitted."""
        return EngineLimits(
            context_window_size=self.context_window_size,
            max_num_sequence=self.max_num_sequence,
            total_pages=self.pool.total_pages,
            page_size=self.pool.page_size,
            window_tokens=(
                self.pool.window + self.prefill_chunk_size + 2 * self.pool.page_size
                if self.pool.window
                else None
            ),
        )

    def add(self, spec: GenerationRequest) -> Request:
        """Queue a request. Returns it already FINISHED when it has no room to generate at all."""
        if spec.request_id in self._requests:
            raise EngineError(f"duplicate request id {spec.request_id!r}")
        max_new_tokens = self.limits.check(spec)
        req = Request.create(spec, max_new_tokens)
        if req.max_new_tokens <= 0:
            for b in req.branches:
                b.finished = True
            req.transition(RequestEvent.FINISH)
            return req
        self._requests[spec.request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Abort at the next step boundary; unknown or finished ids are ignored."""
        if request_id in self._requests:
            self._pending_aborts.setdefault(request_id, reason)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def append_token(self, req: Request, branch_index: int, token_id: int) -> None:
        """Record a sampled token: it is the pending input of the branch's next decode."""
        req.branches[branch_index].output.append(token_id)

    def finish_branch(self, req: Request, branch_index: int, *, cache: bool = True) -> list[int]:
        """End one choice; returns the runner sequences to remove (its own, unless the prefix
        cache keeps it, and any the cache dropped). Ends the request when it was its last choice."""
        branch = req.branches[branch_index]
        if branch.finished:
            raise EngineError(f"{req.request_id}: choice {branch_index} finished twice")
        branch.finished = True
        seq_ids = self._release(req, branch, cache=cache)
        if req.all_finished:
            req.transition(RequestEvent.FINISH)
            self._forget(req)
        return seq_ids

    def fail(self, req: Request) -> list[int]:
        """End a request now (engine error); returns the runner sequences to remove."""
        if req.is_terminal:
            return []
        seq_ids = self._release_all(req, cache=False)  # after an error, trust no KV content
        req.transition(RequestEvent.ABORT)
        self._forget(req)
        return seq_ids

    # -- planning -----------------------------------------------------------------------------

    def clear_prefix_cache(self) -> list[int]:
        """Drop every cached sequence; returns the runner sequences to remove."""
        if self.prefix_cache is None:
            return []
        return self._ids.give_back(self.prefix_cache.clear())

    def schedule(self) -> StepPlan:
        draft = _Draft()
        if self.prefix_cache is not None:
            self.prefix_cache.unpin_all()
        self._apply_aborts(draft)
        decoding: list[Request] = []
        prefilling: list[Request] = []
        for r in self.running:
            (decoding if self._is_decoding(r) else prefilling).append(r)
        self._plan_decodes(draft, decoding)
        budget = self.prefill_chunk_size - sum(len(e.token_ids) for e in draft.entries)
        if draft.entries and self.prefill_tokens_while_decoding is not None:
            budget = min(budget, self.prefill_tokens_while_decoding)
        for req in prefilling:
            if budget <= 0:
                break
            if req.state is not RequestState.RUNNING:
                continue  # preempted for an older request in this loop
            planned = self._plan_prefill(draft, req, budget)
            # Out of pages with nobody decoding, running prefills could wait on each other forever:
            # make room by preempting newer requests that are not in this step's batch.
            while planned == 0 and (victim := self._unplanned_newer(draft, req)) is not None:
                self._preempt(draft, victim)
                planned = self._plan_prefill(draft, req, budget)
            budget -= planned
        # After a preemption, admit nothing this step: the pages just freed would otherwise go
        # straight back to the victim's recompute (thrashing).
        while self.waiting and budget > 0 and not draft.num_preempted:
            req = self.waiting[0]
            seats = sum(len(r.unfinished()) for r in self.running) + len(req.unfinished())
            if seats > self.max_num_sequence or not self._free_slots(draft, req, seats):
                break
            planned = self._plan_prefill(draft, req, budget)
            if planned == 0:
                break  # FIFO: no overtaking, so a long prompt is never starved
            budget -= planned
            self.waiting.popleft()
            req.transition(RequestEvent.ADMIT)
            self.running.append(req)
        return StepPlan(
            entries=tuple(draft.entries),
            removed_seq_ids=tuple(draft.removed),
            added_seq_ids=tuple(draft.added),
            cache_forks=tuple(draft.cache_forks),
            aborted=tuple(draft.aborted),
            length_capped=tuple(draft.capped),
            num_preempted=draft.num_preempted,
            sliding_seq_ids=tuple(draft.sliding),
        )

    def _apply_aborts(self, draft: _Draft) -> None:
        pending, self._pending_aborts = self._pending_aborts, {}
        for request_id in pending:
            req = self._requests.get(request_id)
            if req is None or req.is_terminal:
                continue
            draft.removed.extend(self._release_all(req, cache=True))
            req.transition(RequestEvent.ABORT)
            self._forget(req)
            draft.aborted.append(req)

    def _unplanned_newer(self, draft: _Draft, req: Request) -> Request | None:
        """The most recently started request after req that has nothing in the batch yet."""
        for other in reversed(self.running):
            if other is req:
                return None
            if not any(b.seq_id in draft.touched for b in other.branches):
                return other
        return None

    def _is_decoding(self, req: Request) -> bool:
        live = req.live_branches()
        return (
            bool(live)
            and len(live) == len(req.unfinished())
            and all(b.num_pending == 1 for b in live)
        )

    def _plan_decodes(self, draft: _Draft, decoding: list[Request]) -> None:
        for req in decoding:
            if req.state is not RequestState.RUNNING:
                continue  # preempted earlier in this loop
            live = req.live_branches()
            need = self._decode_pages(live)  # 0 except at a page boundary (or copy-on-write)
            if need:
                self._reclaim(draft, need)  # the cache goes before any request
            while need and self._decode_pages(live) > self.pool.num_free:
                victim = self.running[-1]
                if victim is not req:
                    self._preempt(draft, victim)
                elif len(self.running) > 1:
                    self._preempt(draft, req)
                    break
                else:
                    # Alone and still out of pages: the cache cannot hold this request.
                    starved = next(b for b in live if self._decode_pages([b]) > 0)
                    req_done = self._cap(draft, req, starved)
                    live.remove(starved)
                    if req_done:
                        break
            if req.state is not RequestState.RUNNING:
                continue
            for b in live:
                self._append(draft, req, b, 1, sample=(b.index,))

    def _decode_pages(self, branches: list[Branch]) -> int:
        return sum(self.pool.pages_to_append(self._seq(b), 1) for b in branches)

    def _plan_prefill(self, draft: _Draft, req: Request, budget: int) -> int:
        """Plan chunks for req within budget tokens; returns the tokens planned."""
        planned = 0
        primary, siblings, target = self._prefill_target(req)
        hit = -1  # -1: no prefix lookup (the primary holds its sequence, no cache, or the
        # request needs every prompt position computed)
        cache = self.prefix_cache
        if (
            primary.seq_id is None
            and cache is not None
            and not req.spec.needs_every_position
            and not (self._outgrows_cache(req) and not siblings)
        ):
            hit = self._fork_cached_prefix(draft, primary, target)
        want = min(target - primary.num_cached, budget)
        if want > 0:
            fork_pages = len(siblings) * self.pool.pages_to_fork_at(target)
            self._reclaim(draft, self._grow_pages(primary, want) + fork_pages)
            k = min(want, self.pool.appendable_tokens(primary.seq_id))
            if siblings and primary.num_cached + k == target:
                grow = self._grow_pages(primary, k)
                if grow + fork_pages > self.pool.num_free:
                    k = min(k, target - primary.num_cached - 1)
            if k > 0:
                if primary.seq_id is None:  # (one with siblings to fork cannot slide)
                    primary.seq_id = self._new_seq(draft, windowable=not siblings)
                if hit >= 0:
                    self._record_lookup(req, target, hit)
                completes = primary.num_cached + k == target
                forked = siblings if completes else []
                self._append(draft, req, primary, k, forks=forked)
                planned += k
            elif hit > 0:  # the request does not start after all: give the fork back
                self._undo_cache_fork(draft, primary)
        for b in req.live_branches():
            if b.seq_id in draft.touched or b.num_pending == 0:
                continue  # already in the batch, or forked after it (must wait a step)
            k = min(b.num_pending, budget - planned, self.pool.appendable_tokens(b.seq_id))
            if k > 0:
                self._append(draft, req, b, k)
                planned += k
        return planned

    def _grow_pages(self, b: Branch, k: int) -> int:
        if b.seq_id is None:
            return -(-k // self.pool.page_size)
        return self.pool.pages_to_append(b.seq_id, k)

    def _append(
        self,
        draft: _Draft,
        req: Request,
        b: Branch,
        k: int,
        *,
        sample: tuple[int, ...] | None = None,
        forks: list[Branch] | None = None,
    ) -> None:
        seq_id = self._seq(b)
        start = b.num_cached
        tokens = b.token_slice(start, start + k)
        if self.pool.append(seq_id, k):
            draft.sliding.append(seq_id)
        b.num_cached += k
        fork_ids = []
        for child in forks or ():
            child.seq_id = self._ids.take()
            self.pool.fork(seq_id, child.seq_id)
            child.num_cached = b.num_cached
            fork_ids.append(child.seq_id)
        draft.touched.update(fork_ids)
        draft.touched.add(seq_id)
        if sample is None:
            done = [c for c in [b, *(forks or ())] if c.num_cached == c.num_tokens]
            sample = tuple(c.index for c in done)
        draft.entries.append(BatchEntry(req, seq_id, tokens, tuple(fork_ids), sample, start))

    # -- pages and ids ------------------------------------------------------------------------

    def _preempt(self, draft: _Draft, req: Request) -> None:
        # Not cached: preemption is for pages, which the cache would give right back.
        draft.removed.extend(self._release_all(req, cache=False))
        req.transition(RequestEvent.PREEMPT)
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        draft.num_preempted += 1
        self.num_preemptions_total += 1

    def _cap(self, draft: _Draft, req: Request, b: Branch) -> bool:
        """End branch b with "length" for lack of pages; True when that ended the request."""
        draft.removed.extend(self.finish_branch(req, b.index, cache=False))  # its pages are needed
        draft.capped.append((req, b.index))
        return req.is_terminal

    def _forget(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._pending_aborts.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)

    def _release_all(self, req: Request, *, cache: bool) -> list[int]:
        return [s for b in req.branches for s in self._release(req, b, cache=cache)]

    def _release(self, req: Request, b: Branch, *, cache: bool) -> list[int]:
        """Take b's sequence away; returns the runner sequences to remove (see finish_branch)."""
        seq_id, num_cached = b.seq_id, b.num_cached
        b.seq_id, b.num_cached = None, 0
        if seq_id is None:
            return []
        if (
            cache
            and self.prefix_cache is not None
            and not req.gave_to_prefix_cache
            and num_cached
            and not self.pool.is_sliding(seq_id)  # (its first tokens are gone)
        ):
            req.gave_to_prefix_cache = True
            return self._ids.give_back(
                self.prefix_cache.insert(seq_id, b.token_slice(0, num_cached))
            )
        self.pool.remove(seq_id)
        return self._ids.give_back([seq_id])

    def _new_seq(self, draft: _Draft, *, windowable: bool = False) -> int:
        seq_id = self._ids.take()
        self.pool.add(seq_id, windowable=windowable)
        draft.added.append(seq_id)
        return seq_id

    @staticmethod
    def _seq(b: Branch) -> int:
        if b.seq_id is None:
            raise EngineError(f"choice {b.index} holds no sequence")
        return b.seq_id
