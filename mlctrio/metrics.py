"""Prometheus metrics of one server (its own registry: no global state), one labelled child per
served model (label model_name) of each metric family.

With `vllm_aliases` (`--vllm-metrics`) each metric that has a vLLM twin is a `Tee` that writes
both (metrics_vllm.py), so the callers (server/observer.py) update one attribute as before.
"""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .metrics_vllm import Tee, VllmAliases, VllmFamilies

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


# attribute -> (kind, name, help): the metrics with the one label model_name
_PLAIN: dict[str, tuple[str, str, str]] = {
    "num_requests_running": (
        "gauge", "mlctrio_num_requests_running", "Requests in the running batch."
    ),
    "num_requests_waiting": (
        "gauge", "mlctrio_num_requests_waiting", "Requests waiting for the engine."
    ),
    "kv_cache_usage_ratio": (
        "gauge", "mlctrio_kv_cache_usage_ratio",
        "Fraction of KV-cache pages held by requests (prefix-cache-only pages excluded).",
    ),
    "kv_cache_cached_pages": (
        "gauge", "mlctrio_kv_cache_cached_pages",
        "KV-cache pages held only by the prefix cache (reclaimable on demand).",
    ),
    "prefix_cache_queries": (
        "counter", "mlctrio_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
    ),
    "prefix_cache_hits": (
        "counter", "mlctrio_prefix_cache_hits", "Prompt tokens found in the prefix cache."
    ),
    "prompt_tokens": ("counter", "mlctrio_prompt_tokens", "Prompt tokens processed."),
    "generation_tokens": ("counter", "mlctrio_generation_tokens", "Tokens generated."),
    "num_preemptions": (
        "counter", "mlctrio_num_preemptions", "Sequences preempted for lack of KV pages."
    ),
}  # fmt: skip
_LATENCY = {
    "time_to_first_token_seconds": "Time to the first token.",
    "inter_token_latency_seconds": "Time between two streamed tokens.",
    "e2e_request_latency_seconds": "Time from arrival to the final token.",
    "request_queue_time_seconds": "Time from arrival until the first output.",
}
_TOKENS = {
    "request_prompt_tokens": "Prompt tokens per request.",
    "request_generation_tokens": "Generated tokens per request.",
}


_SPEC = {  # attribute -> help; EngineStats field: spec_<name without spec_decode_>_total
    "spec_decode_num_drafts": "Speculative drafts verified (one per decoding choice and step).",
    "spec_decode_num_draft_tokens": "Tokens drafted and verified.",
    "spec_decode_num_accepted_tokens": "Drafted tokens the target model accepted.",
}


def _families(r: CollectorRegistry) -> dict[str, Any]:
    """The mlctrio_* metric families of a registry, by attribute name (created once per
    registry: prometheus refuses a name registered twice; each model labels its children)."""
    lbl = ["model_name"]
    out: dict[str, Any] = {}
    for attr, (kind, name, doc) in _PLAIN.items():
        out[attr] = (Gauge if kind == "gauge" else Counter)(name, doc, lbl, registry=r)
    for attr, doc in _LATENCY.items():
        out[attr] = Histogram(f"mlctrio_{attr}", doc, lbl, buckets=_LATENCY_BUCKETS, registry=r)
    for attr, doc in _TOKENS.items():
        out[attr] = Histogram(f"mlctrio_{attr}", doc, lbl, buckets=_TOKEN_BUCKETS, registry=r)
    out["_success"] = Counter(
        "mlctrio_request_success",
        "Requests finished, by finish reason.",
        ["model_name", "finished_reason"],
        registry=r,
    )
    for attr, doc in _SPEC.items():
        out[attr] = Counter(f"mlctrio_{attr}", doc, ["model_name", "mode"], registry=r)
    out["spec_decode_mean_accepted_length"] = Gauge(
        "mlctrio_spec_decode_mean_accepted_length",
        "Drafted tokens accepted per verified draft, since start (tokens per step: this + 1).",
        ["model_name", "mode"],
        registry=r,
    )
    out["_aborted"] = Counter(
        "mlctrio_requests_aborted", "Requests aborted, by reason.", ["model_name", "reason"],
        registry=r,
    )  # fmt: skip
    return out


@attrs.define(slots=False)
class Metrics:
    """The mlctrio_* metrics of one model, labelled with its model_name (and vLLM's names too, on
    request). Several models share one registry: `for_model(name)` gives another model's
    children of the same families, rendered together by `render()`."""

    model_name: str
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    vllm_aliases: bool = False
    _families: dict[str, Any] | None = None  # shared with the other models of the registry
    _vllm_families: VllmFamilies | None = None

    def __attrs_post_init__(self) -> None:
        if self._families is None:
            self._families = _families(self.registry)
        families, m = self._families, self.model_name

        def child(attr: str) -> Any:
            return families[attr].labels(m)

        self.num_requests_running = child("num_requests_running")
        self.num_requests_waiting = child("num_requests_waiting")
        self.kv_cache_usage_ratio = child("kv_cache_usage_ratio")
        self.kv_cache_cached_pages = child("kv_cache_cached_pages")
        self.prefix_cache_queries = child("prefix_cache_queries")
        self.prefix_cache_hits = child("prefix_cache_hits")
        self.prompt_tokens = child("prompt_tokens")
        self.generation_tokens = child("generation_tokens")
        self.num_preemptions = child("num_preemptions")
        self.request_prompt_tokens = child("request_prompt_tokens")
        self.request_generation_tokens = child("request_generation_tokens")
        self._hist: dict[str, Any] = {attr: child(attr) for attr in _LATENCY}
        self._success = self._families["_success"]
        self._aborted = self._families["_aborted"]
        self._last_totals: dict[str, int] = {}  # the engine's running totals, last seen
        self._vllm: VllmAliases | None = None
        if self.vllm_aliases:
            if self._vllm_families is None:
                self._vllm_families = VllmFamilies(self.registry)
            self._vllm = VllmAliases(self._vllm_families, m)
            for name, twin in self._vllm.children.items():
                if name in self._hist:
                    self._hist[name] = Tee((self._hist[name], twin))
                else:
                    setattr(self, name, Tee((getattr(self, name), twin)))

    def for_model(self, model_name: str) -> Metrics:
        """Another model's metrics: its own children of the same families and registry."""
        return Metrics(
            model_name, self.registry, self.vllm_aliases, self._families, self._vllm_families
        )

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
        mode = getattr(stats, "spec_mode", "disable")
        if mode != "disable":
            self._observe_spec(stats, mode)

    def _observe_spec(self, stats: Any, mode: str) -> None:
        assert self._families is not None
        for attr in _SPEC:
            field = "spec_" + attr.removeprefix("spec_decode_") + "_total"
            self._advance(self._families[attr].labels(self.model_name, mode), stats, field)
        if stats.spec_num_drafts_total:
            mean = stats.spec_num_accepted_tokens_total / stats.spec_num_drafts_total
            self._families["spec_decode_mean_accepted_length"].labels(self.model_name, mode).set(
                mean
            )

    def _advance(self, counter: Any, stats: Any, total_field: str) -> None:
        total = int(getattr(stats, total_field, 0))
        last = self._last_totals.get(total_field, 0)
        if total > last:
            counter.inc(total - last)
            self._last_totals[total_field] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
