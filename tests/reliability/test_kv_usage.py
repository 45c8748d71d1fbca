"""Issue 16, item 9: kv_cache_usage_ratio counts the pages requests hold, not the prefix cache's
reclaimable pages (vLLM's meaning); the cached pages and the prefix-cache query/hit token counters
are reported on their own, in EngineStats and on /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.metrics import Metrics
from mlctrio.runtime.core import EngineCore
from mlctrio.testing.echo import build_echo_core

PROMPT = "a prompt long enough to fill a few KV pages of sixteen tokens each"


def run(core: EngineCore, rid: str, text: str) -> None:
    core.add_request(GenerationRequest(rid, tuple(text.encode()), SamplingParams(max_tokens=4)))
    for _ in range(1000):
        if not core.has_work():
            return
        core.step()
    raise AssertionError("the engine did not drain")


def request_pages(core: EngineCore) -> int:
    """Distinct pages held by the live branches of running requests, counted from the pool."""
    pool = core.scheduler.pool
    seqs = [b.seq_id for r in core.scheduler.running for b in r.branches if b.seq_id is not None]
    return len({p for s in seqs for p in pool.pages_of(s)})


def samples(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_warm_idle_cache_is_not_usage() -> None:
    core, _, _ = build_echo_core(total_pages=64, prefix_cache_mode="radix")
    run(core, "warm", PROMPT)
    stats = core.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_cached_pages > 0  # the finished request's KV stays cached...
    assert stats.free_pages + stats.num_cached_pages == stats.total_pages
    assert stats.kv_cache_usage_ratio == 0.0  # ...but holds nothing a request needs


def test_usage_counts_request_pages_shared_with_the_cache() -> None:
    core, _, _ = build_echo_core(total_pages=64, prefix_cache_mode="radix")
    run(core, "warm", PROMPT)
    cached_before = core.stats().num_cached_pages
    core.add_request(GenerationRequest("again", tuple(PROMPT.encode()), SamplingParams()))
    core.step()  # forks the cached prefix and prefills the rest
    stats = core.stats()
    held = request_pages(core)
    assert held > 0 and stats.num_running == 1
    assert stats.kv_cache_usage_ratio == held / stats.total_pages
    # Pages the running request shares with the cache are the request's, not cached-only.
    assert stats.num_cached_pages < cached_before
    assert held + stats.num_cached_pages + stats.free_pages == stats.total_pages


def test_prefix_cache_counters_grow_with_a_repeated_prompt_and_reach_metrics() -> None:
    core, _, _ = build_echo_core(total_pages=64, prefix_cache_mode="radix")
    metrics = Metrics("m")
    run(core, "first", PROMPT)
    first = core.stats()
    metrics.observe_engine(first)
    seen = samples(metrics)
    assert first.num_prefix_cache_query_tokens_total == len(PROMPT)
    assert first.num_prefix_cache_hit_tokens_total == 0  # cold
    assert seen["mlctrio_prefix_cache_queries_total"] == len(PROMPT)
    assert seen["mlctrio_prefix_cache_hits_total"] == 0
    assert seen["mlctrio_kv_cache_usage_ratio"] == 0.0
    assert seen["mlctrio_kv_cache_cached_pages"] == first.num_cached_pages > 0

    run(core, "second", PROMPT)
    second = core.stats()
    metrics.observe_engine(second)
    seen = samples(metrics)
    hits = second.num_prefix_cache_hit_tokens_total
    assert second.num_prefix_cache_query_tokens_total == 2 * len(PROMPT)
    assert 0 < hits < len(PROMPT)  # all but the last prompt token, which must be computed
    assert seen["mlctrio_prefix_cache_queries_total"] == 2 * len(PROMPT)
    assert seen["mlctrio_prefix_cache_hits_total"] == hits
    assert seen["mlctrio_kv_cache_usage_ratio"] == 0.0


def test_without_prefix_cache_idle_usage_is_zero_and_busy_usage_is_the_request_pages() -> None:
    core, _, _ = build_echo_core(total_pages=64)
    core.add_request(GenerationRequest("r", tuple(PROMPT.encode()), SamplingParams()))
    core.step()
    stats = core.stats()
    assert stats.kv_cache_usage_ratio == request_pages(core) / stats.total_pages > 0
    while core.has_work():
        core.step()
    stats = core.stats()
    assert stats.kv_cache_usage_ratio == 0.0 and stats.num_cached_pages == 0
