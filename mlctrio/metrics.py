"""Prometheus metrics of one server (its own registry: no global state).

With `vllm_aliases` (`--vllm-metrics`) each metric that has a vLLM twin is a `Tee` that writes
both (metrics_vllm.py), so the callers (server/observer.py) update one attribute as before.
"""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .metrics_vllm import Tee, VllmAliases

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


@attrs.define(slots=False)
class Metrics:
    """The mlctrio_* metrics, labelled with model_name (and vLLM's names too, on request)."""

    model_name: str
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    vllm_aliases: bool = False

    def __attrs_post_init__(self) -> None:
        r, m, lbl = self.registry, self.model_name, ["model_name"]
        self.num_requests_running = Gauge(
            "mlctrio_num_requests_running", "Requests in the running batch.", lbl, registry=r
        ).labels(m)
        self.num_requests_waiting = Gauge(
            "mlctrio_num_requests_waiting", "Requests waiting for the engine.", lbl, registry=r
        ).labels(m)
        self.kv_cache_usage_ratio = Gauge(
            "mlctrio_kv_cache_usage_ratio",
            "Fraction of KV-cache pages held by requests (prefix-cache-only pages excluded).",
            lbl,
            registry=r,
        ).labels(m)
        self.kv_cache_cached_pages = Gauge(
            "mlctrio_kv_cache_cached_pages",
            "KV-cache pages held only by the prefix cache (reclaimable on demand).",
            lbl,
            registry=r,
        ).labels(m)
        self.prefix_cache_queries = Counter(
            "mlctrio_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            lbl,
            registry=r,
        ).labels(m)
        self.prefix_cache_hits = Counter(
            "mlctrio_prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            lbl,
            registry=r,
        ).labels(m)
        self.prompt_tokens = Counter(
            "mlctrio_prompt_tokens", "Prompt tokens processed.", lbl, registry=r
        ).labels(m)
        self.generation_tokens = Counter(
            "mlctrio_generation_tokens", "Tokens generated.", lbl, registry=r
        ).labels(m)
        self._success = Counter(
            "mlctrio_request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._aborted = Counter(
            "mlctrio_requests_aborted",
            "Requests aborted, by reason.",
            ["model_name", "reason"],
            registry=r,
        )
        self.num_preemptions = Counter(
            "mlctrio_num_preemptions", "Sequences preempted for lack of KV pages.", lbl, registry=r
        ).labels(m)
        hist = {
            "time_to_first_token_seconds": "Time to the first token.",
            "inter_token_latency_seconds": "Time between two streamed tokens.",
            "e2e_request_latency_seconds": "Time from arrival to the final token.",
            "request_queue_time_seconds": "Time from arrival until the first output.",
        }
        self._hist: dict[str, Any] = {
            name: Histogram(
                f"mlctrio_{name}", doc, lbl, buckets=_LATENCY_BUCKETS, registry=r
            ).labels(m)
            for name, doc in hist.items()
        }
        self.request_prompt_tokens = Histogram(
            "mlctrio_request_prompt_tokens",
            "Prompt tokens per request.",
            lbl,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        ).labels(m)
        self.request_generation_tokens = Histogram(
            "mlctrio_request_generation_tokens",
            "Generated tokens per request.",
            lbl,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        ).labels(m)
        self._last_totals: dict[str, int] = {}  # the engine's running totals, last seen
        self._vllm = VllmAliases(r, m) if self.vllm_aliases else None
        if self._vllm is not None:
            for name, twin in self._vllm.children.items():
                if name in self._hist:
                    self._hist[name] = Tee((self._hist[name], twin))
                else:
                    setattr(self, name, Tee((getattr(self, name), twin)))

    @property
    def time_to_first_token(self) -> Any:
        return self._hist["time_to_first_token_seconds"]

    @property
    def inter_token_latency(self) -> Any:
        return self._hist["inter_token_latency_seconds"]

    @property
    def e2e_request_latency(self) -> Any:
        return self._hist["e2e_request_latency_seconds"]

    @property
    def request_queue_time(self) -> Any:
        return self._hist["request_queue_time_seconds"]

    def request_finished(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()
        if self._vllm is not None:
            self._vllm.request_finished(finished_reason)

    def request_aborted(self, reason: str) -> None:
        self._aborted.labels(self.model_name, reason).inc()
        if self._vllm is not None:
            self._vllm.request_finished("abort")

    def observe_engine(self, stats: Any) -> None:
        """Copy the engine core's gauges and advance the counters by its totals' growth (called
        once per engine step, on the trio side). A field the core does not report counts as 0."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_ratio.set(stats.kv_cache_usage_ratio)
        self.kv_cache_cached_pages.set(getattr(stats, "num_cached_pages", 0))
        self._advance(self.num_preemptions, stats, "num_preemptions_total")
        self._advance(self.prefix_cache_queries, stats, "num_prefix_cache_query_tokens_total")
        self._advance(self.prefix_cache_hits, stats, "num_prefix_cache_hit_tokens_total")

    def _advance(self, counter: Any, stats: Any, total_field: str) -> None:
        total = int(getattr(stats, total_field, 0))
        last = self._last_totals.get(total_field, 0)
        if total > last:
            counter.inc(total - last)
            self._last_totals[total_field] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
