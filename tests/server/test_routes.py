"""Health, metrics, tokenize/detokenize, debug routes and the OpenAPI document."""

from __future__ import annotations

import jsonschema
import pytest

from .conftest import ServerHandle, metric_total

MODEL = "mock://echo"


def test_health_ready(server: ServerHandle) -> None:
    with server.client() as http:
        response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_metrics_follow_requests(server: ServerHandle) -> None:
    with server.client() as http:
        before = http.get("/metrics").text
        http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "metrics!"}]},
        )
        http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "abcdef"}],
                "max_tokens": 2,
            },
        )
        server.wait_quiescent()
        after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    gen = "mlctrio_generation_tokens_total"
    # "metrics!" echoed plus its EOS, then 2 tokens cut by max_tokens.
    assert metric_total(text, gen) - metric_total(before, gen) == len("metrics!") + 1 + 2
    ok = "mlctrio_request_success_total"
    for reason in ("stop", "length"):
        grew = metric_total(text, ok, finished_reason=reason) - metric_total(
            before, ok, finished_reason=reason
        )
        assert grew == 1, reason
    for name in (
        "mlctrio_time_to_first_token_seconds_count",
        "mlctrio_e2e_request_latency_seconds_count",
        "mlctrio_request_queue_time_seconds_count",
        "mlctrio_request_prompt_tokens_count",
        "mlctrio_request_generation_tokens_count",
    ):
        assert metric_total(text, name) - metric_total(before, name) == 2, name
    itl = "mlctrio_inter_token_latency_seconds_count"
    assert metric_total(text, itl) - metric_total(before, itl) == len("metrics!") + 1
    for name in (
        "mlctrio_num_requests_running",
        "mlctrio_num_requests_waiting",
        "mlctrio_kv_cache_usage_ratio",
        "mlctrio_num_preemptions_total",
        "mlctrio_prompt_tokens_total",
        "mlctrio_requests_aborted_total",
    ):
        assert name in text, name
    assert f'model_name="{MODEL}"' in text
    assert metric_total(text, "mlctrio_kv_cache_usage_ratio") == 0.0


def test_tokenize_detokenize_round_trip(server: ServerHandle) -> None:
    with server.client() as http:
        tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "héllo"}).json()
        assert tokens["count"] == len(tokens["tokens"])
        assert tokens["max_model_len"] > 0
        text = http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
        assert text == {"prompt": "héllo"}
        chat = http.post(
            "/tokenize",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ).json()
        assert chat["count"] >= 2


def test_debug_routes(server: ServerHandle, server_factory) -> None:  # type: ignore[no-untyped-def]
    with server.client() as http:
        http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "trace me"}]},
        )
        trace = http.post("/debug/dump_event_trace").json()
        config = http.get("/debug/config").json()
    names = {e["name"] for e in trace["traceEvents"]}
    assert {
        "received",
        "tokenized",
        "queued",
        "prefill_start",
        "prefill_end",
        "first_token",
        "step",
        "finished",
        "thread_name",
    } <= names
    assert all("ts" in e for e in trace["traceEvents"] if e["ph"] != "M")
    assert config["engine"]["context_window_size"] > 0
    assert config["server"]["model"] == MODEL
    plain = server_factory()
    with plain.client() as http:
        assert http.get("/debug/config").status_code == 404


def test_openapi_document_matches_real_responses(server: ServerHandle) -> None:
    with server.client() as http:
        doc = http.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        paths = doc["paths"]
        for route in (
            "/v1/models",
            "/v1/chat/completions",
            "/v1/completions",
            "/tokenize",
            "/detokenize",
            "/health",
            "/metrics",
        ):
            assert route in paths, route
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "schema"}],
                "logprobs": True,
                "top_logprobs": 1,
            },
        ).json()
        completion = http.post("/v1/completions", json={"model": MODEL, "prompt": "s"}).json()
        models = http.get("/v1/models").json()
        error = http.post("/v1/chat/completions", json={"model": MODEL}).json()
    _validate(doc, "/v1/chat/completions", "post", "200", chat)
    _validate(doc, "/v1/completions", "post", "200", completion)
    _validate(doc, "/v1/models", "get", "200", models)
    _validate(doc, "/v1/chat/completions", "post", "400", error)


def _validate(doc: dict, path: str, method: str, status: str, instance: object) -> None:  # type: ignore[type-arg]
    response = doc["paths"][path][method]["responses"][status]
    schema = response["content"]["application/json"]["schema"]
    resolver_schema = {**schema, "components": doc.get("components", {})}
    try:
        jsonschema.validate(instance, resolver_schema)
    except jsonschema.ValidationError as exc:  # pragma: no cover - message for the failure
        pytest.fail(f"{path} {status}: {exc.message}")
