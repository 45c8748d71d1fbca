"""Shared checks for engine tests over the echo fake: a reference model of what a request must
produce, a collector that enforces the output contract step by step, and the page-mirror check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import attrs

from mlctrio.engine.pages import PagePool
from mlctrio.engine.types import RequestOutput, SamplingParams
from mlctrio.runtime.core import EngineCore
from mlctrio.testing.echo import (
    ENDOFTEXT,
    FILLER,
    IM_END,
    ByteTokenizer,
    EchoRunner,
    RawChatTemplate,
)


@attrs.frozen
class Expected:
    text: str
    finish_reason: str
    stop_reason: str | int | None
    num_tokens: int


def expected_echo(
    tokenizer: ByteTokenizer, prompt: Sequence[int], params: SamplingParams, window: int
) -> Expected:
    """What one choice must produce, computed the slow obvious way (whole-text search)."""
    eos = tokenizer.eos_token_ids[0]
    template_ids = set(RawChatTemplate().stop_token_ids)
    # ignore_eos: every end-of-generation token is banned and the fake's filler comes instead;
    # only the request's own stop ids still stop.
    banned: set[int] = set()
    stop_ids = template_ids | set(params.stop_token_ids) | {eos}
    if params.ignore_eos:
        eog = {eos, *template_ids, *(tokenizer.special_id(t) for t in (ENDOFTEXT, IM_END))}
        banned = eog - set(params.stop_token_ids)
        stop_ids = set(params.stop_token_ids)
    filler = tokenizer.encode(FILLER)[0]
    limit = len(prompt) + 10**6 if params.max_tokens is None else params.max_tokens
    limit = min(limit, window - len(prompt))
    detok = tokenizer.detokenizer(params.skip_special_tokens)
    text = ""
    stops = [s for s in params.stop if s]

    def cut(candidate: str) -> tuple[str, str] | None:
        hits = [(candidate.find(s) + len(s), -len(s), s) for s in stops if s in candidate]
        if not hits:
            return None
        end, minus_len, s = min(hits)
        return candidate[: end + minus_len], s

    for i in range(limit):
        token = prompt[i] if i < len(prompt) else eos
        if token in banned:
            token = filler
        if token in stop_ids:
            text += detok.flush()
            hit = cut(text)
            if hit:
                return Expected(hit[0], "stop", hit[1], i + 1)
            return Expected(text, "stop", None if token == eos else token, i + 1)
        text += detok.push(token)
        hit = cut(text)
        if hit:
            return Expected(hit[0], "stop", hit[1], i + 1)
    text += detok.flush()
    hit = cut(text)
    if hit:
        return Expected(hit[0], "stop", hit[1], limit)
    return Expected(text, "length", None, limit)


@attrs.define
class ChoiceLog:
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@attrs.define
class RequestLog:
    n: int
    choices: dict[int, ChoiceLog] = attrs.field(factory=dict)
    final: RequestOutput | None = None
    num_records: int = 0


class Collector:
    """Enforces the output contract on every record: one final record per request, nothing after
    it, finish_reason once per choice, every choice finished by the final record."""

    def __init__(self) -> None:
        self.logs: dict[str, RequestLog] = {}

    def expect(self, request_id: str, n: int) -> None:
        self.logs[request_id] = RequestLog(n, {i: ChoiceLog() for i in range(n)})

    def feed(self, outputs: Sequence[RequestOutput]) -> None:
        seen = [o.request_id for o in outputs]
        assert len(seen) == len(set(seen)), f"two records for one request in a step: {seen}"
        for out in outputs:
            log = self.logs[out.request_id]
            assert log.final is None, f"{out.request_id}: record after the final one"
            log.num_records += 1
            for delta in out.deltas:
                choice = log.choices[delta.index]
                assert choice.finish_reason is None, f"{out.request_id}/{delta.index}: after finish"
                if delta.finish_reason is None:  # (a final flush may hold a cut-off character)
                    assert "\ufffd" not in delta.text, "a delta split a UTF-8 character"
                choice.text += delta.text
                choice.token_ids.extend(delta.token_ids)
                choice.finish_reason = delta.finish_reason
                choice.stop_reason = delta.stop_reason
            if out.finished:
                log.final = out
                assert all(c.finish_reason for c in log.choices.values()), "unfinished choice"
                completion = sum(len(c.token_ids) for c in log.choices.values())
                assert out.usage.completion_tokens == completion
            else:
                assert not all(c.finish_reason for c in log.choices.values())

    def unfinished(self) -> list[str]:
        return [rid for rid, log in self.logs.items() if log.final is None]


def check_mirror(core: EngineCore) -> None:
    """The scheduler's page mirror equals the echo runner's cache, page for page in count."""
    pool = core.scheduler.pool
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    assert pool.num_free + pool.num_used == pool.total_pages
    assert pool.num_free == runner.free_pages()
    assert sorted(pool.seq_ids()) == runner.sequence_ids()
    for seq_id in pool.seq_ids():
        assert pool.length(seq_id) == runner.sequence_length(seq_id)
        assert len(pool.pages_of(seq_id)) == len(runner.pages_of(seq_id))
    check_pool_ownership(pool, shared_pages_full=True)
    owners = Counter(p for s in runner.sequence_ids() for p in set(runner.pages_of(s)))
    shared_runner = sorted(c for c in owners.values() if c > 1)
    owners_pool = Counter(p for s in pool.seq_ids() for p in set(pool.pages_of(s)))
    assert shared_runner == sorted(c for c in owners_pool.values() if c > 1)
    # live branches and cached sequences hold exactly the pool's sequences
    live = [
        b.seq_id
        for r in [*core.scheduler.running, *core.scheduler.waiting]
        for b in r.branches
        if b.seq_id is not None
    ]
    cache = core.scheduler.prefix_cache
    cached = cache.seq_ids() if cache is not None else []
    assert sorted(live + cached) == sorted(pool.seq_ids())
    if cache is not None:
        check_prefix_cache(core)


def check_prefix_cache(core: EngineCore) -> None:
    """The cache's tree is sound and says what is really in the runner; it is within budget, in
    sequences, in runner slots with the seats running requests reserve, and in pages."""
    scheduler = core.scheduler
    cache = scheduler.prefix_cache
    runner = core.runner
    assert cache is not None and isinstance(runner, EchoRunner)
    cache.tree.check()
    assert len(cache) <= cache.max_num_seqs
    seats = sum(len(r.unfinished()) for r in scheduler.running)
    assert seats + len(cache) <= scheduler.max_num_sequence
    for seq_id in cache.seq_ids():
        tokens = cache.tree.tokens(seq_id)
        assert runner.tokens_of(seq_id) == tokens
        assert scheduler.pool.length(seq_id) == len(tokens)
        others = [s for s in cache.seq_ids() if s != seq_id]
        assert not any(cache.tree.tokens(s)[: len(tokens)] == tokens for s in others), (
            "a cached sequence is a prefix of another"
        )
    stats = core.stats()
    assert stats.free_pages + stats.num_cached_pages <= stats.total_pages
    if not scheduler.has_work():
        assert stats.free_pages + stats.num_cached_pages == stats.total_pages


def check_pool_ownership(pool: PagePool, *, shared_pages_full: bool) -> None:
    """No page owned twice except by refcount; shared pages are full; free pages have no owner."""
    counts: Counter[int] = Counter()
    for seq_id in pool.seq_ids():
        pages = pool.pages_of(seq_id)
        assert len(set(pages)) == len(pages), "a sequence lists a page twice"
        counts.update(pages)
    for page, count in counts.items():
        assert pool.refcount(page) == count
    assert len(counts) == pool.num_used
    for seq_id in pool.seq_ids() if shared_pages_full else ():
        pages = pool.pages_of(seq_id)
        full = pool.length(seq_id) // pool.page_size
        for position, page in enumerate(pages):
            if counts[page] > 1:
                assert position < full, "a shared page must be full"
