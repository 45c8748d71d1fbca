"""The prefix cache: radix tree structure (insert, match, split, merge), the LRU and budget rules of
`PrefixCache`, and — through EngineCore over the echo fake — fewer prefilled tokens, the same
output, usage and stats, and eviction before preemption."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from mlctrio.engine.pages import PagePool
from mlctrio.engine.prefix_cache import PrefixCache, PrefixMatch, RadixTree
from mlctrio.engine.types import GenerationRequest, RequestOutput, SamplingParams
from mlctrio.runtime.core import EngineCore
from mlctrio.testing.echo import EchoRunner, build_echo_core

from .echo_harness import check_mirror

# -- RadixTree ------------------------------------------------------------------------------------


def test_insert_splits_and_match_finds_the_longest_shared_prefix() -> None:
    tree = RadixTree()
    tree.insert(0, [1, 2, 3, 4, 5])
    tree.insert(1, [1, 2, 3, 9])  # splits the edge after 1, 2, 3
    tree.insert(2, [1, 2])  # ends inside the shared edge: splits again
    tree.check()
    assert tree.match([1, 2, 3, 4, 5, 6]) == (5, frozenset({0}))
    assert tree.match([1, 2, 3, 7]) == (3, frozenset({0, 1}))
    assert tree.match([1, 2]) == (2, frozenset({0, 1, 2}))
    assert tree.match([1, 8]) == (1, frozenset({0, 1, 2}))
    assert tree.match([7]) == (0, frozenset())
    assert tree.match([]) == (0, frozenset())
    assert sorted(tree.prefixes_of([1, 2, 3, 9, 9])) == [1, 2]
    assert sorted(tree.prefixes_of([1, 2, 3, 4, 5])) == [0, 2]
    assert tree.tokens(1) == (1, 2, 3, 9)


def test_remove_prunes_and_merges_back() -> None:
    tree = RadixTree()
    tree.insert(0, [1, 2, 3, 4])
    tree.insert(1, [1, 2, 5])
    tree.insert(2, [1, 2])
    tree.remove(2)  # node [1, 2] now ends nothing but still branches: stays
    tree.check()
    tree.remove(1)  # [1, 2] has one child and no end: merged into [1, 2, 3, 4]
    tree.check()
    assert tree.match([1, 2, 5]) == (2, frozenset({0}))
    tree.remove(0)
    tree.check()
    assert len(tree) == 0 and tree.match([1]) == (0, frozenset())


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 7), st.lists(st.integers(0, 3), min_size=1)),
        max_size=40,
    )
)
def test_tree_agrees_with_brute_force(ops: list[tuple[bool, int, list[int]]]) -> None:
    tree = RadixTree()
    seqs: dict[int, tuple[int, ...]] = {}
    for insert, seq_id, tokens in ops:
        if insert and seq_id not in seqs:
            tree.insert(seq_id, tokens)
            seqs[seq_id] = tuple(tokens)
        elif not insert and seq_id in seqs:
            tree.remove(seq_id)
            del seqs[seq_id]
        tree.check()
        probe = tuple(tokens)

        def common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        best = max((common(probe, t) for t in seqs.values()), default=0)
        sharers = frozenset(s for s, t in seqs.items() if best and common(probe, t) == best)
        assert tree.match(probe) == (best, sharers)
        want = sorted(s for s, t in seqs.items() if probe[: len(t)] == t)
        assert sorted(tree.prefixes_of(probe)) == want


# -- PrefixCache ----------------------------------------------------------------------------------


def _cached(pool: PagePool, cache: PrefixCache, seq_id: int, tokens: list[int]) -> list[int]:
    pool.add(seq_id)
    pool.append(seq_id, len(tokens))
    return cache.insert(seq_id, tokens)


def test_lru_budget_redundancy_and_reclaim() -> None:
    pool = PagePool(total_pages=16, page_size=4)
    cache = PrefixCache(pool, max_num_seqs=2)
    assert _cached(pool, cache, 0, [1, 2, 3, 4, 5]) == []
    assert _cached(pool, cache, 1, [7, 7, 7, 7, 7, 7]) == []
    assert _cached(pool, cache, 2, [1, 2, 3]) == [2]  # covered by 0: dropped at once
    assert not pool.has(2)
    # a match never reuses the last token asked for, and touches nothing until used
    assert cache.match([1, 2, 3, 4, 5]) == PrefixMatch(0, 4)
    assert cache.match([1]) is None and cache.match([9, 1]) is None
    fork, gone = cache.fork_prefix([1, 2, 3, 4, 5, 6], lambda: 5)
    assert fork == (0, 5, 5) and gone == [] and pool.length(5) == 5 and 0 in cache.pinned
    pool.remove(5)
    cache.unpin_all()
    # 0 was used last, so 1 is the LRU: the budget of 2 evicts it for a newcomer
    assert _cached(pool, cache, 3, [8, 8]) == [1]
    # a sequence extending a cached one supersedes it
    assert _cached(pool, cache, 4, [1, 2, 3, 4, 5, 6, 7]) == [0]
    assert sorted(cache.seq_ids()) == [3, 4]
    assert cache.num_cached_pages() == 1 + 2
    assert cache.reclaim(pool.total_pages) == [3, 4] and pool.num_free == pool.total_pages
    assert cache.num_evictions_total == 3


def test_pinned_and_kept_sequences_are_evicted_last() -> None:
    pool = PagePool(total_pages=8, page_size=4)
    cache = PrefixCache(pool, max_num_seqs=4)
    for seq_id, first in enumerate([1, 2, 3]):
        _cached(pool, cache, seq_id, [first] * 8)
    cache.pinned.add(0)
    assert cache.shrink(2, [2] * 5) == [2]  # 0 pinned, 1 kept for the probe: 2 goes ...
    assert sorted(cache.seq_ids()) == [0, 1]
    assert cache.shrink(0, [2] * 5) == [1]  # ... then the kept one, never the pinned one
    assert cache.reclaim(8) == [] and cache.seq_ids() == [0]


# -- the engine -----------------------------------------------------------------------------------

SYSTEM = "You are a helpful echo. " * 8  # 192 bytes = 12 pages of 16


def _run(core: EngineCore, requests: dict[str, str], **params: object) -> dict[str, RequestOutput]:
    """Submit one after another, each to its end, checking the echo; returns the final records."""
    tok = core.tokenizer
    finals: dict[str, RequestOutput] = {}
    for rid, text in requests.items():
        prompt = tuple(tok.encode(text))
        core.add_request(GenerationRequest(rid, prompt, SamplingParams(**params)))  # type: ignore[arg-type]
        texts: dict[int, str] = {}
        while core.has_work():
            for out in core.step():
                for d in out.deltas:
                    texts[d.index] = texts.get(d.index, "") + d.text
                if out.finished:
                    finals[rid] = out
            check_mirror(core)
        assert set(texts.values()) == {text}
    return finals


def test_second_request_prefills_only_what_is_new() -> None:
    core, _, _ = build_echo_core(prefix_cache_mode="radix")
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    first, second = SYSTEM + "first question?", SYSTEM + "second one!"
    _run(core, {"a": first})
    before = runner.num_tokens_total
    finals = _run(core, {"b": second})
    generated = finals["b"].usage.completion_tokens
    prefilled = runner.num_tokens_total - before - (generated - 1)  # decodes feed 1 token each
    assert prefilled == len("second one!")
    assert finals["b"].usage.cached_tokens == len(SYSTEM)
    stats = core.stats()
    assert stats.num_prefix_cache_query_tokens_total == len(first) + len(second)
    assert stats.num_prefix_cache_hit_tokens_total == len(SYSTEM)
    # the same prompt again: everything but its last token comes from the cache
    finals = _run(core, {"c": second})
    assert finals["c"].usage.cached_tokens == len(second) - 1


def test_output_is_the_same_with_and_without_the_cache() -> None:
    prompts = {f"r{i}": SYSTEM[: 40 * i] + f"user {i} é世" for i in range(6)}
    prompts["again"] = prompts["r3"]
    outputs = {}
    for mode in ("disable", "radix"):
        core, _, _ = build_echo_core(prefix_cache_mode=mode, total_pages=40)
        finals = _run(core, prompts, n=2, temperature=0.7, seed=3)
        outputs[mode] = {
            rid: (f.usage.prompt_tokens, f.usage.completion_tokens) for rid, f in finals.items()
        }
        hits = core.stats().num_prefix_cache_hit_tokens_total
        assert (hits > 0) == (mode == "radix")
    assert outputs["radix"] == outputs["disable"]


def test_interleaved_requests_match_the_reference() -> None:
    """Many requests sharing prefixes in flight together, under page pressure, n > 1."""
    from .echo_harness import Collector, expected_echo

    core, tok, _ = build_echo_core(
        prefix_cache_mode="radix", total_pages=30, max_num_sequence=5, prefill_chunk_size=40
    )
    collector = Collector()
    params = SamplingParams(n=2, temperature=0.9)
    prompts = {f"q{i}": tuple(tok.encode(SYSTEM[: 10 * (i % 7)] + f"#{i}")) for i in range(24)}
    pending = list(prompts.items())
    for _ in range(5000):
        if pending and (len(pending) % 3 != 0 or not core.has_work()):
            rid, prompt = pending.pop(0)
            core.add_request(GenerationRequest(rid, prompt, params))
            collector.expect(rid, 2)
        if not core.has_work() and not pending:
            break
        collector.feed(core.step())
        check_mirror(core)
    assert collector.unfinished() == []
    for rid, prompt in prompts.items():
        want = expected_echo(tok, prompt, params, 2048)
        for choice in collector.logs[rid].choices.values():
            assert (choice.text, choice.finish_reason) == (want.text, want.finish_reason)
    assert core.stats().num_prefix_cache_hit_tokens_total > 0


def test_cached_pages_are_evicted_before_anything_is_preempted() -> None:
    core, tok, _ = build_echo_core(prefix_cache_mode="radix", total_pages=24, max_num_sequence=8)
    # fill the cache: 3 finished requests of 5 pages each (prompt + echo in the KV cache)
    _run(core, {f"c{i}": chr(ord("a") + i) * 40 for i in range(3)})
    stats = core.stats()
    assert stats.num_cached_pages == 15 and stats.free_pages == 9
    # three unrelated requests that need 3 x 6 pages at their peak: only the cache can give them
    prompts = {"x": "x" * 45, "y": "y" * 45, "z": "z" * 45}
    for rid, text in prompts.items():
        core.add_request(GenerationRequest(rid, tuple(tok.encode(text)), SamplingParams()))
    texts: dict[str, str] = {}
    while core.has_work():
        for out in core.step():
            texts[out.request_id] = texts.get(out.request_id, "") + "".join(
                d.text for d in out.deltas
            )
        check_mirror(core)
    assert texts == prompts
    stats = core.stats()
    assert stats.num_preemptions_total == 0
    cache = core.scheduler.prefix_cache
    assert cache is not None and cache.num_evictions_total >= 2
    assert stats.free_pages + stats.num_cached_pages == stats.total_pages


def test_cached_sequences_give_up_their_runner_slots() -> None:
    """max_num_sequence=1 (interactive mode): a cached sequence must leave to admit anyone."""
    core, _, _ = build_echo_core(prefix_cache_mode="radix", max_num_sequence=1)
    finals = _run(core, {"a": SYSTEM + "one", "b": SYSTEM + "two", "c": "other"})
    assert all(f.usage.cached_tokens == 0 for f in finals.values())
    assert core.scheduler.prefix_cache is not None and len(core.scheduler.prefix_cache) == 1


def test_abort_caches_the_computed_prefix_and_close_frees_everything() -> None:
    core, tok, _ = build_echo_core(prefix_cache_mode="radix", prefill_chunk_size=64)
    runner = core.runner
    assert isinstance(runner, EchoRunner)
    prompt = tuple(tok.encode(SYSTEM))
    core.add_request(GenerationRequest("a", prompt, SamplingParams()))
    core.step()  # 64 of 192 prompt tokens computed
    core.abort_request("a")
    (record,) = core.step()
    assert record.finished and record.deltas[0].finish_reason == "abort"
    assert core.stats().num_cached_pages == 4 and runner.sequence_ids() == [0]
    finals = _run(core, {"b": SYSTEM})
    assert finals["b"].usage.cached_tokens == 64
    assert core.stats().num_cached_pages > 0
    core.close()
    assert runner.sequence_ids() == [] and runner.free_pages() == runner.total_pages()
    assert core.stats().num_cached_pages == 0


def test_disabled_cache_behaves_as_before() -> None:
    core, _, _ = build_echo_core()  # the echo default: off, as the server tests expect
    assert core.scheduler.prefix_cache is None
    finals = _run(core, {"a": SYSTEM + "1", "b": SYSTEM + "2"})
    assert [f.usage.cached_tokens for f in finals.values()] == [0, 0]
    stats = core.stats()
    assert stats.free_pages == stats.total_pages and stats.num_cached_pages == 0
    assert stats.num_prefix_cache_query_tokens_total == 0


def _recount_cached_pages(pool: PagePool, cache: PrefixCache) -> int:
    """num_cached_pages from scratch: pages every one of whose references is a cached sequence."""
    cached = set(cache.seq_ids())
    held_by_live = {p for s in pool.seq_ids() if s not in cached for p in pool.pages_of(s)}
    return len({p for s in cached for p in pool.pages_of(s)} - held_by_live)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["cache", "fork", "grow", "finish", "evict"]),
            st.lists(st.integers(0, 2), min_size=1, max_size=12),
        ),
        max_size=40,
    )
)
# a finished fork gives its shared page back to the cache alone; growth copies nothing shared
@example([("cache", [0, 0, 0]), ("fork", [0, 0, 0]), ("grow", [1]), ("finish", [0])])
def test_the_kept_cached_page_count_always_equals_a_recount(
    ops: list[tuple[str, list[int]]],
) -> None:
    """num_cached_pages is kept between calls (it is read every step); after any sequence of
    inserts, prefix forks, decode growth, finished forks and evictions it equals a recount."""
    pool = PagePool(total_pages=64, page_size=2)
    cache = PrefixCache(pool, max_num_seqs=4)
    live: dict[int, list[int]] = {}
    next_id = [100]

    def new_id() -> int:
        next_id[0] += 1
        return next_id[0]

    for op, tokens in ops:
        if op == "cache" and pool.num_free >= 8:
            _cached(pool, cache, new_id(), tokens)
        elif op == "fork" and pool.num_free >= 8:
            forked, _ = cache.fork_prefix([*tokens, 9], new_id)
            if forked is not None:
                live[forked[1]] = list(tokens)  # (parent, child, fork position)
            cache.unpin_all()
        elif op == "grow" and live and pool.num_free >= 8:
            seq = next(iter(live))
            pool.append(seq, len(tokens))
        elif op == "finish" and live:
            pool.remove(live.popitem()[0])
        elif op == "evict":
            cache.evict_lru()
        assert cache.num_cached_pages() == _recount_cached_pages(pool, cache), (op, tokens)
