"""`EngineStats`: the snapshot of an engine core that /metrics, /get_load and /debug read.

Rules: a frozen record of counts; `EngineCore.stats()` (runtime/core.py) fills it once per step.
Totals only grow; gauges (running, waiting, pages) are the state after the step.
"""

from __future__ import annotations

import attrs


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
