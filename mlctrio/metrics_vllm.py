"""vLLM's metric names on /metrics (`--vllm-metrics`, MLCTRIO_VLLM_METRICS=1).

Dashboards, routers (the Gateway API Inference Extension's endpoint picker) and KEDA/HPA rules
written for vLLM then read mlctrio unchanged.

Rules: names, types, label names (`model_name`, `engine`) and buckets are vLLM v1's
(vllm/v1/metrics/loggers.py, PrometheusStatLogger); `engine` is always "0" (one engine core per
served model; several models are told apart by `model_name`). Only metrics whose meaning mlctrio
measures the same way get an alias: no prefill/decode time split, no LoRA or cache-config info,
none of vLLM's deprecated names. Every value is written
at the same point as its mlctrio_* twin, through `Tee` (metrics.py): nothing is computed twice.
"""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENGINE = "0"
# vLLM's FinishReason values, created at 0 up front as vLLM does (dashboards see every series).
FINISH_REASONS = ("stop", "length", "abort")

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM's build_1_2_5_buckets(max_model_len); the context window is unknown before the model
# loads, so the series runs to 100k tokens.
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5) if m * 10**e <= 100_000)

# mlctrio attribute (metrics.py) -> (vLLM name, kind, help, buckets)
_ALIASES: dict[str, tuple[str, str, str, tuple[float, ...]]] = {
    "num_requests_running": (
        "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", ()
    ),
    "num_requests_waiting": (
        "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", ()
    ),
    "kv_cache_usage_ratio": (
        "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", ()
    ),
    "prefix_cache_queries": (
        "vllm:prefix_cache_queries", "counter",
        "Prefix cache queries, in terms of number of queried tokens.", (),
    ),
    "prefix_cache_hits": (
        "vllm:prefix_cache_hits", "counter",
        "Prefix cache hits, in terms of number of cached tokens.", (),
    ),
    "num_preemptions": (
        "vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.", ()
    ),
    "prompt_tokens": ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", ()),
    "generation_tokens": (
        "vllm:generation_tokens", "counter", "Number of generation tokens processed.", ()
    ),
    "request_prompt_tokens": (
        "vllm:request_prompt_tokens", "histogram", "Number of prefill tokens processed.",
        _TOKEN_BUCKETS,
    ),
    "request_generation_tokens": (
        "vllm:request_generation_tokens", "histogram", "Number of generation tokens processed.",
        _TOKEN_BUCKETS,
    ),
    "time_to_first_token_seconds": (
        "vllm:time_to_first_token_seconds", "histogram",
        "Histogram of time to first token in seconds.", _TTFT_BUCKETS,
    ),
    "inter_token_latency_seconds": (
        "vllm:inter_token_latency_seconds", "histogram",
        "Histogram of inter-token latency in seconds.", _ITL_BUCKETS,
    ),
    "e2e_request_latency_seconds": (
        "vllm:e2e_request_latency_seconds", "histogram",
        "Histogram of e2e request latency in seconds.", _REQUEST_LATENCY_BUCKETS,
    ),
    "request_queue_time_seconds": (
        "vllm:request_queue_time_seconds", "histogram",
        "Histogram of time spent in WAITING phase for request.", _REQUEST_LATENCY_BUCKETS,
    ),
}  # fmt: skip


@attrs.frozen
class Tee:
    """One metric child seen as several: inc/set/observe reach every one of them."""

    children: tuple[Any, ...]

    def inc(self, amount: float = 1.0) -> None:
        for child in self.children:
            child.inc(amount)

    def set(self, value: float) -> None:
        for child in self.children:
            child.set(value)

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)


class VllmFamilies:
    """The vllm:* metric families of a registry (once per registry; every model labels them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name", "engine"]
        self.families: dict[str, Any] = {}
        for attr, (name, kind, doc, buckets) in _ALIASES.items():
            if kind == "gauge":
                metric: Any = Gauge(name, doc, labels, registry=registry)
            elif kind == "counter":
                metric = Counter(name, doc, labels, registry=registry)
            else:
                metric = Histogram(name, doc, labels, buckets=buckets, registry=registry)
            self.families[attr] = metric
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=registry,
        )


class VllmAliases:
    """One model's children of the vllm:* metrics, one per mlctrio attribute in `children`."""

    def __init__(self, families: VllmFamilies, model_name: str) -> None:
        self.model_name = model_name
        self.children: dict[str, Any] = {
            attr: family.labels(model_name, ENGINE) for attr, family in families.families.items()
        }
        self._success = families.success
        for reason in FINISH_REASONS:
            self._success.labels(model_name, ENGINE, reason)

    def request_finished(self, finished_reason: str) -> None:
        """vLLM counts every finished request here, aborted ones as "abort"."""
        self._success.labels(self.model_name, ENGINE, finished_reason).inc()
