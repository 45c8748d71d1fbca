"""`EngineStats`: the snapshot of an engine core that /metrics, /get_load and /debug read.

Rules: a frozen record of counts; `EngineCore.stats()` (runtime/core.py) fills it once per step
(`snapshot`).
Totals only grow; gauges (running, waiting, pages) are the state after the step.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..engine.scheduler import Scheduler


@attrs.frozen
class EngineStats:
    """A snapshot of the engine for /metrics and /debug."""

    num_running: int
    num_waiting: int
    num_preemptions_total: int
    free_pages: int
    total_pages: int
    kv_cache_usage_ratio: float  # pages held by requests / total (cached-only pages excluded)
    num_prompt_tokens_total: int  # prompt tokens of admitted requests, each request once
    num_generation_tokens_total: int  # tokens sampled
    num_prefix_cache_query_tokens_total: int = 0  # tokens looked up when prefills started
    num_prefix_cache_hit_tokens_total: int = 0  # of which reused (not computed)
    num_steps_total: int = 0
    num_cached_pages: int = 0  # held only by the prefix cache: reclaimable, not free
    num_requests_failed_total: int = 0  # requests ended by an engine error
    #: speculative decoding (runtime/speculative.py): the mode, drafts verified, tokens drafted
    #: and drafted tokens accepted
    spec_mode: str = "disable"
    spec_num_drafts_total: int = 0
    spec_num_draft_tokens_total: int = 0
    spec_num_accepted_tokens_total: int = 0


def snapshot(scheduler: Scheduler, counts: dict[str, Any]) -> EngineStats:
    """The scheduler's gauges and totals, with the core's own `counts` (EngineStats fields)."""
    pool = scheduler.pool
    cache = scheduler.prefix_cache
    num_cached_pages = cache.num_cached_pages() if cache else 0
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_preemptions_total=scheduler.num_preemptions_total,
        free_pages=pool.num_free,
        total_pages=pool.total_pages,
        kv_cache_usage_ratio=(pool.num_used - num_cached_pages) / pool.total_pages,
        num_prefix_cache_query_tokens_total=cache.num_query_tokens_total if cache else 0,
        num_prefix_cache_hit_tokens_total=cache.num_hit_tokens_total if cache else 0,
        num_cached_pages=num_cached_pages,
        **counts,
    )
