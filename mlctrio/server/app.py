"""The Quart-Trio application: hooks (auth, CORS, errors, limits) and the small routes.

Rules: `create_app` builds the app and its `ServerState` (server/state.py, in
`app.extensions["mlctrio"]`), with one `ServedModel` (its own engine and metrics children) per
served model; every handler is a module-level function that finds the state
through the app. The OpenAI generation routes live in server/openai_routes.py and below; nothing
imports this module back (no cycle). The app knows the engine only through AsyncEngine
(service.py): nothing here imports runtime/, models/ or tvm. The ASGI app is wrapped in
server/asgi.py's ConnectionGuard (early answers, request-end cleanups).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from typing import Any

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from ..config import ServerConfig
from ..errors import AuthenticationError, InvalidRequestError, RequestError
from ..metrics import Metrics
from ..service import AbortReason, AsyncEngine, EngineState, serve_engine, shut_down
from . import cors
from .asgi import ConnectionGuard
from .errors import error_response, from_http_exception, internal_error
from .observer import EngineObserver, EventTrace
from .openai_routes import register_openai_routes
from .state import EXTENSION, ServedModel, ServerState, current_state, json_response, read_json

__all__ = ["ServedModel", "ServerState", "create_app", "drain", "json_response", "read_json"]

log = logging.getLogger("mlctrio.server")

OPEN_ROUTES = frozenset({"/health", "/"})  # "/": the chat page (routes_page.py)


def _check_api_key(keys: tuple[bytes, ...]) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Pass it as 'Authorization: Bearer YOUR_KEY'."
        )
    supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:  # compare with every key: time does not reveal which one matched
        ok |= hmac.compare_digest(supplied, key)
    if not ok:
        raise AuthenticationError("Incorrect API key provided.")


def served_models(
    config: ServerConfig, engines: Sequence[AsyncEngine], metrics: Metrics, trace: EventTrace | None
) -> dict[str, ServedModel]:
    """One ServedModel per engine, in `config.served_names` order; each engine's observer feeds
    its own model's metrics children (one registry for all) and its own trace process."""
    names, sources = config.served_names, [c.model for c in config.model_configs()]
    if len(engines) != len(names):
        raise ValueError(f"{len(engines)} engines for {len(names)} models ({', '.join(names)})")
    models = {}
    for name, source, engine in zip(names, sources, engines, strict=True):
        model_metrics = metrics if name == metrics.model_name else metrics.for_model(name)
        pid = trace.process(name) if trace is not None else 1
        engine._observer = EngineObserver(model_metrics, trace, pid=pid)
        models[name] = ServedModel(name, source, engine)
    return models


def create_app(
    config: ServerConfig,
    engine: AsyncEngine,
    *,
    additional_engines: Sequence[AsyncEngine] = (),
    own_engine: bool = True,
    sse_ping_interval_s: float = 10.0,
) -> QuartTrio:
    """Build the app: `engine` serves the main model, `additional_engines` the models of
    `config.additional_models`, in order. With own_engine the app's lifespan nursery runs the
    engines (the `hypercorn -k trio mlctrio.app:app` path); otherwise the caller's nursery does
    (`mlctrio serve`, tests)."""
    app = QuartTrio("mlctrio")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # we enforce our own deadline; never cut streams
    app.config["BODY_TIMEOUT"] = 60
    metrics = Metrics(model_name=config.model_name, vllm_aliases=config.vllm_metrics)
    trace = EventTrace(config.trace_buffer_size) if config.enable_tracing else None
    engines = [engine, *additional_engines]
    models = served_models(config, engines, metrics, trace)
    state = ServerState(config, engine, metrics, trace, sse_ping_interval_s, models)
    app.extensions[EXTENSION] = state
    app.asgi_app = ConnectionGuard(app.asgi_app, config.max_body_bytes)  # type: ignore[method-assign,assignment,arg-type]

    if own_engine:

        @app.before_serving
        async def _start_engine() -> None:
            # start_soon, not start: Hypercorn serves (/health 503) while the models load.
            for each in engines:
                app.nursery.start_soon(serve_engine, each)

        @app.after_serving
        async def _stop_engine() -> None:
            for each in engines:
                shut_down(each)

    app.before_request(_auth_and_cors)
    app.after_request(_cors_headers)
    app.register_error_handler(RequestError, _request_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal)
    app.add_url_rule("/health", view_func=health, methods=["GET"])
    app.add_url_rule("/metrics", view_func=metrics_route, methods=["GET"])
    app.add_url_rule("/v1/models", view_func=list_models, methods=["GET"])
    app.url_map.converters["model_id"] = ModelIdConverter
    app.add_url_rule(
        "/v1/models/<model_id:model>", view_func=get_model, methods=["GET"], merge_slashes=False
    )
    app.add_url_rule("/openapi.json", view_func=openapi, methods=["GET"])
    if config.enable_debug:
        app.add_url_rule("/debug/dump_event_trace", view_func=dump_event_trace, methods=["POST"])
        app.add_url_rule("/debug/config", view_func=debug_config, methods=["GET"])
    register_openai_routes(app)
    return app


# ---- hooks -----------------------------------------------------------------------------------


async def _auth_and_cors() -> Response | None:
    config = current_state().config
    preflight = cors.preflight(config)
    if preflight is not None:
        return preflight
    if config.api_keys and request.path not in OPEN_ROUTES and request.method != "OPTIONS":
        _check_api_key(tuple(k.encode() for k in config.api_keys))
    return None


async def _cors_headers(response: Response) -> Response:
    cors.decorate(current_state().config, response)
    return response


async def _request_error(exc: RequestError) -> Response:
    return error_response(exc)


async def _http_error(exc: HTTPException) -> Response:
    return error_response(from_http_exception(exc))


async def _internal(exc: Exception) -> Response:
    return internal_error(exc)


# ---- the small routes ------------------------------------------------------------------------


#: Which state /health reports for the server when its models' states differ: the worst.
_HEALTH_ORDER = (
    EngineState.FAILED,
    EngineState.STOPPED,
    EngineState.DRAINING,
    EngineState.LOADING,
    EngineState.READY,
)


async def health() -> Response:
    """200 once every model's engine is ready; 503 otherwise. With several models the body
    also gives each model's state."""
    models = current_state().models
    states = {name: served.engine.state for name, served in models.items()}
    status = min(states.values(), key=_HEALTH_ORDER.index)
    body: dict[str, Any] = {"status": status.value}
    if len(states) > 1:
        body["models"] = {name: state.value for name, state in states.items()}
    return json_response(body, 200 if status is EngineState.READY else 503)


async def metrics_route() -> Response:
    body = current_state().metrics.render()
    return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(served: ServedModel) -> dict[str, Any]:
    info = served.info()
    return {
        "id": served.name,
        "object": "model",
        "created": info.created,
        "owned_by": "mlctrio",
        "root": served.source,
        "max_model_len": info.context_window_size,
    }


async def list_models() -> Response:
    """Every served model (503 while one still loads: its card needs its info)."""
    cards = [_model_card(served) for served in current_state().models.values()]
    return json_response({"object": "list", "data": cards})


class ModelIdConverter(PathConverter):
    """A model id in a URL path: anything, slashes included, even a leading or a doubled one
    (`org/name`, `/models/llama`, `mock://echo`; the SDK sends them percent-encoded, and the
    server decodes %2F before routing). werkzeug's `path` refuses a leading slash, and its slash
    merging would redirect `/v1/models//models/llama` elsewhere: hence `merge_slashes=False`."""

    regex = ".+"
    part_isolating = False  # the id spans path segments


async def get_model(model: str) -> Response:
    return json_response(_model_card(current_state().served(model)))


async def openapi() -> Response:
    from ..protocol.openapi import openapi_document

    config = current_state().config
    return json_response(
        openapi_document(
            api_key_required=bool(config.api_keys),
            extra_paths=_DEBUG_PATHS if config.enable_debug else None,
        )
    )


async def dump_event_trace() -> Response:
    trace = current_state().trace
    if trace is None:
        raise InvalidRequestError(
            "Event tracing is off: start the server with --enable-tracing.",
            code="tracing_disabled",
        )
    return json_response(trace.dump())


async def debug_config() -> Response:
    state = current_state()
    info = state.model_info()
    return json_response(
        {
            "server": attrs.asdict(state.config, value_serializer=_jsonable),
            "engine": dict(info.config),
        }
    )


_DEBUG_PATHS: dict[str, Any] = {
    "/debug/dump_event_trace": {
        "post": {
            "summary": "The event trace (Chrome trace JSON), needs --enable-tracing",
            "responses": {
                "200": {
                    "description": "Chrome trace format",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
    "/debug/config": {
        "get": {
            "summary": "The resolved server and engine configuration",
            "responses": {
                "200": {
                    "description": "configuration",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


def _jsonable(_inst: Any, _field: Any, value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if _field is not None and _field.name == "api_keys":
        return ["***"] * len(value)
    return value


async def drain(state: ServerState, timeout_s: float) -> None:
    """Stop taking requests, let in-flight ones finish up to timeout_s, abort the rest (every
    model's engine, together)."""
    engines = [served.engine for served in state.models.values()]
    for engine in engines:
        engine.state = EngineState.DRAINING

    async def idle() -> None:
        for engine in engines:
            await engine.wait_idle()

    with trio.move_on_after(timeout_s):
        await idle()
    unfinished = sum(engine.num_in_flight for engine in engines)
    if unfinished:
        log.warning("shutdown: aborting %d unfinished request(s)", unfinished)
        for engine in engines:
            engine.abort_all(AbortReason.SHUTDOWN)
        with trio.move_on_after(5):
            await idle()
