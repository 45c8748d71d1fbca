"""Every metric that deploy/ reads is on a real server's /metrics, and --vllm-metrics adds vLLM's
names (vllm/v1/metrics/loggers.py: names, types, labels) carrying the mlctrio values.

Two mock://echo servers (flag on and off) serve one chat completion each; the series names of
a Prometheus family are derived from its type (a counter `x` is read as `x_total`, a histogram
as `x_bucket`/`x_sum`/`x_count`), so a labelled family with no sample yet still counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlctrio.app import config_from_env
from mlctrio.cli import RaisingParser, build_parser, config_from_args
from tests.server.conftest import ServerHandle, make_config, metric_total, start_server

from .manifests import metric_references

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
# vLLM v1's PrometheusStatLogger, for the metrics mlctrio measures the same way
VLLM_TYPES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}
# mlctrio series -> its vLLM twin
TWINS = {
    "mlctrio_prompt_tokens_total": "vllm:prompt_tokens_total",
    "mlctrio_generation_tokens_total": "vllm:generation_tokens_total",
    "mlctrio_num_requests_running": "vllm:num_requests_running",
    "mlctrio_num_requests_waiting": "vllm:num_requests_waiting",
    "mlctrio_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",
    "mlctrio_prefix_cache_queries_total": "vllm:prefix_cache_queries_total",
    "mlctrio_time_to_first_token_seconds_count": "vllm:time_to_first_token_seconds_count",
    "mlctrio_inter_token_latency_seconds_count": "vllm:inter_token_latency_seconds_count",
    "mlctrio_e2e_request_latency_seconds_sum": "vllm:e2e_request_latency_seconds_sum",
    "mlctrio_request_queue_time_seconds_count": "vllm:request_queue_time_seconds_count",
    "mlctrio_request_prompt_tokens_sum": "vllm:request_prompt_tokens_sum",
    "mlctrio_request_generation_tokens_sum": "vllm:request_generation_tokens_sum",
}


def scrape(handle: ServerHandle) -> str:
    """/metrics after one streamed chat completion has finished."""
    with handle.client() as http:
        body = {
            "model": "mock://echo",
            "messages": [{"role": "user", "content": "one two three four"}],
            "stream": True,
        }
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert any("[DONE]" in line for line in response.iter_lines())
        handle.wait_quiescent()

        def counted() -> bool:  # the finished request reaches the counters after the stream
            return metric_total(http.get("/metrics").text, "mlctrio_request_success_total") >= 1

        handle.wait_until(counted, what="the finished request counted")
        return http.get("/metrics").text


def series_names(text: str) -> set[str]:
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def scraped() -> Iterator[dict[bool, str]]:
    """/metrics of a server with --vllm-metrics (True) and of one without (False)."""
    texts = {}
    for flag in (False, True):
        handle = start_server(make_config(model="mock://echo?delay_ms=1", vllm_metrics=flag))
        try:
            texts[flag] = scrape(handle)
        finally:
            handle.stop()
    yield texts


def test_every_metric_deploy_reads_is_served(scraped: dict[bool, str]) -> None:
    with_flag, without = series_names(scraped[True]), series_names(scraped[False])
    references = metric_references()
    for reader in ("grafana", "epp", "keda", "hpa"):
        assert references[reader], f"no metric found in the {reader} config"
    for reader, names in references.items():
        assert names <= with_flag, f"{reader} reads {sorted(names - with_flag)}"
        native = {n for n in names if n.startswith("mlctrio_")}
        assert native <= without, f"{reader} reads {sorted(native - without)}"
    # the EPP and the dashboard work without the flag
    assert all(n.startswith("mlctrio_") for n in references["epp"] | references["grafana"])


def test_vllm_names_only_with_the_flag(scraped: dict[bool, str]) -> None:
    assert not [n for n in series_names(scraped[False]) if n.startswith("vllm:")]
    families = {f.name: f for f in text_string_to_metric_families(scraped[True])}
    vllm = {  # the text parser reads a `_created` series as a gauge family of its own
        name: f.type
        for name, f in families.items()
        if name.startswith("vllm:") and not name.endswith("_created")
    }
    assert vllm == VLLM_TYPES
    for name in VLLM_TYPES:
        for sample in families[name].samples:
            assert sample.labels["model_name"] == "mock://echo"
            assert sample.labels["engine"] == "0"
    success = {
        s.labels["finished_reason"]
        for s in families["vllm:request_success"].samples
        if s.name.endswith("_total")
    }
    assert {"stop", "length", "abort"} <= success


def test_vllm_twins_carry_the_mlctrio_values(scraped: dict[bool, str]) -> None:
    text = scraped[True]
    assert metric_total(text, "mlctrio_generation_tokens_total") > 0
    assert metric_total(text, "mlctrio_time_to_first_token_seconds_count") == 1
    for native, twin in TWINS.items():
        assert metric_total(text, twin) == metric_total(text, native), twin
    for reason in ("stop", "length"):
        assert metric_total(
            text, "vllm:request_success_total", finished_reason=reason
        ) == metric_total(text, "mlctrio_request_success_total", finished_reason=reason)


def test_the_flag_from_the_command_line_and_the_environment() -> None:
    parse = build_parser(RaisingParser).parse_args
    assert config_from_args(parse(["serve", "mock://echo", "--vllm-metrics"])).vllm_metrics
    assert not config_from_args(parse(["serve", "mock://echo"])).vllm_metrics
    env = {"MLCTRIO_MODEL": "mock://echo"}
    assert config_from_env({**env, "MLCTRIO_VLLM_METRICS": "1"}).vllm_metrics
    assert not config_from_env(env).vllm_metrics


def test_an_aborted_request_counts_as_vllm_abort() -> None:
    """A client that disconnects mid-stream: mlctrio_requests_aborted and vLLM's
    request_success{finished_reason="abort"} both count it."""
    handle = start_server(make_config(model="mock://echo?delay_ms=50", vllm_metrics=True))
    try:
        body = {
            "model": "mock://echo",
            "messages": [{"role": "user", "content": "a b c d e f g h i j k l m n o p"}],
            "stream": True,
        }
        with handle.client() as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                next(response.iter_lines())  # the first chunk, then hang up
            handle.wait_quiescent()

            def aborted() -> bool:
                text = http.get("/metrics").text
                return metric_total(text, "mlctrio_requests_aborted_total") == 1

            handle.wait_until(aborted, what="the abort counted")
            text = http.get("/metrics").text
        assert metric_total(text, "vllm:request_success_total", finished_reason="abort") == 1
        assert metric_total(text, "vllm:request_success_total", finished_reason="stop") == 0
    finally:
        handle.stop()
