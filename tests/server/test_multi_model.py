"""Several models served by one server (`--additional-models`), each addressed by name.

Two echo models that differ in what a client can observe: `b` has a 512-token context window
(mock://echo's tokens are bytes), so a 600-byte prompt is fine for `a` and a 400 for `b`; each
model's engine, name and metrics children are its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from mlctrio.config import ModelSpec, ServerConfig
from mlctrio.loader import CoreFactory, core_factory
from mlctrio.model_loads import ModelSet
from mlctrio.service import EngineState

from .conftest import ServerHandle, metric_total
from .test_lifecycle import _free_port, _reap, _wait_ready, start_hypercorn

TWO = {
    "served_model_name": "a",
    "additional_models": (ModelSpec("mock://echo?context_window=512", "b"),),
}
LONG = "x" * 600  # fits a's 4096-token window, not b's 512


@pytest.fixture
def two(server_factory: Callable[..., ServerHandle]) -> ServerHandle:
    return server_factory(vllm_metrics=True, **TWO)


@pytest.fixture
def client(two: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=two.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_each_model_answers_under_its_own_name(client: openai.OpenAI, two: ServerHandle) -> None:
    for name in ("a", "b"):
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"hello {name}"}]
        )
        assert (chat.model, chat.choices[0].message.content) == (name, f"hello {name}")
        text = client.completions.create(model=name, prompt=f"say {name}", max_tokens=64)
        assert (text.model, text.choices[0].text) == (name, f"say {name}")
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "streamed"}], stream=True
        )
        with stream:
            chunks = list(stream)
        assert {c.model for c in chunks} == {name}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed"
    # The request reached the named model's engine: only b has b's context window.
    long_chat = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": LONG}]
    )
    assert long_chat.choices[0].message.content == LONG
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.chat.completions.create(model="b", messages=[{"role": "user", "content": LONG}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model="b", prompt=LONG)
    # A route without a model field (None) gets the main model.
    assert two.running is not None and two.running.state.served(None).name == "a"


def test_an_unknown_model_is_404_naming_the_served_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}])
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert error["message"] == "The model `c` does not exist. This server serves `a`, `b`."
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("c")


def test_models_lists_and_finds_every_model(client: openai.OpenAI, two: ServerHandle) -> None:
    assert [m.id for m in client.models.list().data] == ["a", "b"]
    assert client.models.retrieve("b").id == "b"
    with two.client() as http:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["a"]["max_model_len"] == 4096 and cards["a"]["root"] == "mock://echo"
        assert cards["b"]["max_model_len"] == 512
        assert cards["b"]["root"] == "mock://echo?context_window=512"
        assert http.get("/v1/models/b").json() == cards["b"]
        # The router's routes describe the main model.
        assert http.get("/server_info").json()["served_model_name"] == "a"


def test_metrics_have_each_models_own_children(client: openai.OpenAI, two: ServerHandle) -> None:
    for name, count in (("a", 1), ("b", 2)):
        for _ in range(count):
            client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "count"}]
            )
    two.wait_until(lambda: all(s.engine.num_in_flight == 0 for s in _models(two).values()))
    with two.client() as http:
        text = http.get("/metrics").text
    for name, count in (("a", 1), ("b", 2)):
        ok = {"model_name": name, "finished_reason": "stop"}
        assert metric_total(text, "mlctrio_request_success_total", **ok) == count
        assert metric_total(text, "vllm:request_success_total", **ok) == count
        # "count" is 5 byte tokens, then EOS.
        assert metric_total(text, "mlctrio_generation_tokens_total", model_name=name) == 6 * count
        assert metric_total(text, "mlctrio_num_requests_running", model_name=name) == 0
    assert text.count("# TYPE mlctrio_request_success_total counter") == 1  # one family


def test_the_event_trace_has_one_process_per_model(
    server_factory: Callable[..., ServerHandle],
) -> None:
    handle = server_factory(enable_debug=True, enable_tracing=True, **TWO)
    with handle.client() as http:
        ids = {}
        for name in ("a", "b"):
            body = {"model": name, "messages": [{"role": "user", "content": "trace"}]}
            ids[name] = http.post("/v1/chat/completions", json=body).json()["id"]
        events = http.post("/debug/dump_event_trace").json()["traceEvents"]
        server_config = http.get("/debug/config").json()["server"]
    assert server_config["additional_models"] == [
        {"model": "mock://echo?context_window=512", "served_name": "b"}
    ]
    pids = {e["args"]["name"]: e["pid"] for e in events if e["name"] == "process_name"}
    assert sorted(pids) == ["a", "b"] and pids["a"] != pids["b"]
    for name, request_id in ids.items():
        mine = [e for e in events if e["ph"] != "M" and e["args"]["request_id"] == request_id]
        assert {"received", "finished"} <= {e["name"] for e in mine}
        assert {e["pid"] for e in mine} == {pids[name]}


def _models(handle: ServerHandle) -> dict[str, object]:
    assert handle.running is not None
    return handle.running.state.models  # type: ignore[return-value]


def _gated(name: str, release: threading.Event) -> Callable[[ServerConfig], ModelSet]:
    """Models whose load of `name` waits for `release` (a slow load the test controls)."""

    def factory_for(config: ServerConfig) -> CoreFactory:
        build = core_factory(config)
        if config.model_name != name:
            return build

        def wait_then_build():  # type: ignore[no-untyped-def]
            assert release.wait(30), "the test never released the load"
            return build()

        return wait_then_build

    return lambda config: ModelSet.build(config, factory_for=factory_for)


def test_health_is_503_until_every_model_is_loaded(
    server_factory: Callable[..., ServerHandle],
) -> None:
    release = threading.Event()
    handle = server_factory(models=_gated("b", release), wait_ready=False, **TWO)
    try:
        with handle.client() as http:
            health = http.get("/health")
            assert health.status_code == 503
            assert health.json() == {
                "status": "loading",
                "models": {"a": "loading", "b": "loading"},
            }
            for path in ("/v1/models", "/v1/models/b"):
                assert http.get(path).status_code == 503
            chat = {"model": "a", "messages": [{"role": "user", "content": "early"}]}
            assert http.post("/v1/chat/completions", json=chat).status_code == 503
            release.set()
            handle.wait_until(lambda: http.get("/health").status_code == 200, 30, "ready")
            assert http.get("/health").json() == {
                "status": "ready",
                "models": {"a": "ready", "b": "ready"},
            }
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
    finally:
        release.set()


def test_health_reports_the_worst_engine_and_shutdown_stops_them_all(
    server_factory: Callable[..., ServerHandle],
) -> None:
    handle = server_factory(**TWO)
    engines = {name: served.engine for name, served in handle.running.state.models.items()}  # type: ignore[union-attr]
    assert handle.token is not None

    def set_b(state: EngineState) -> None:
        trio.from_thread.run_sync(setattr, engines["b"], "state", state, trio_token=handle.token)

    with handle.client() as http:
        set_b(EngineState.DRAINING)
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "draining", "models": {"a": "ready", "b": "draining"}}
        set_b(EngineState.READY)
        assert http.get("/health").status_code == 200
    handle.stop()
    assert {name: e.state for name, e in engines.items()} == {
        "a": EngineState.STOPPED,
        "b": EngineState.STOPPED,
    }


def test_a_model_that_cannot_load_is_named_in_the_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    argv = [sys.executable, "-m", "mlctrio", "serve", "mock://echo", "--port", "0",
            "--additional-models", f"{missing}:m"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"mlctrio: error: cannot load {missing}: model path {missing} does not exist"
    )


def test_hypercorn_serves_the_models_of_mlctrio_additional_models() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLCTRIO_MODEL": "mock://echo",
        "MLCTRIO_SERVED_MODEL_NAME": "a",
        "MLCTRIO_ADDITIONAL_MODELS": "mock://echo?context_window=512:b,mock://echo:c",
    }
    proc = start_hypercorn(port, env)
    lines = None
    try:
        lines = _wait_ready(proc)
        assert lines.seen[-1].endswith("INFO mlctrio: ready: serving a, b, c")
        models = httpx.get(url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["a", "b", "c"]
        body = {"model": "c", "messages": [{"role": "user", "content": "env"}]}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=10).json()
        assert (reply["model"], reply["choices"][0]["message"]["content"]) == ("c", "env")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        _reap(proc, lines)


@pytest.mark.slow  # loads the real TVM engine (demo://tiny, compiled once per machine)
def test_a_real_model_beside_the_echo_model(
    server_factory: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)  # an earlier test's pool size
    handle = server_factory(
        served_model_name="echo",
        additional_models=(ModelSpec("demo://tiny", "tiny"),),
        enable_debug=True,
    )
    with openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0) as client:
        echo = client.completions.create(model="echo", prompt="same prompt", max_tokens=8)
        tiny = client.completions.create(
            model="tiny", prompt="same prompt", max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    assert (echo.model, echo.choices[0].text) == ("echo", "same pro")
    assert tiny.model == "tiny" and tiny.usage is not None
    assert tiny.usage.completion_tokens == 8  # random weights: not the echo
    assert handle.running is not None
    info = handle.running.state.served("tiny").info()
    # Two models: each engine's TVM pool gets half the cores (model_loads.split_threads).
    assert info.config["num_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    # Sized from the shared plan: the echo model (no weights) left the whole budget.
    memory = info.config["memory"]
    assert memory["budget_bytes"] > memory["weight_bytes"] + memory["kv_cache_bytes"] > 0


def test_tokenize_and_embeddings_take_any_served_model(two: ServerHandle) -> None:
    with httpx.Client(base_url=two.url) as http:
        for name in ("a", "b"):
            tokens = http.post("/tokenize", json={"model": name, "prompt": "hi"}).json()
            window = 4096 if name == "a" else 512
            assert tokens["max_model_len"] == window and tokens["count"] == 2
            text = http.post("/detokenize", json={"model": name, "tokens": [104, 105]}).json()
            assert text == {"prompt": "hi"}
            embedded = http.post("/v1/embeddings", json={"model": name, "input": "hi"}).json()
            assert embedded["model"] == name and len(embedded["data"][0]["embedding"]) == 8
        too_long = http.post("/v1/embeddings", json={"model": "b", "input": LONG})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
