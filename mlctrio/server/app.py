"""The Quart-Trio application: hooks (auth, CORS, errors, limits) and the small routes.

Rules: `create_app` builds the app and its `ServerState` (server/state.py, in
`app.extensions["mlctrio"]`); every handler is a module-level function that finds the state
through the app. The OpenAI generation routes live in server/openai_routes.py and below; nothing
imports this module back (no cycle). The app knows the engine only through AsyncEngine
(service.py): nothing here imports runtime/, models/ or tvm. The ASGI app is wrapped in
server/asgi.py's ConnectionGuard (early answers, request-end cleanups).
"""

from __future__ import annotations

import hmac
import logging
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
from ..service import AbortReason, AsyncEngine, EngineState, serve_engine, stop_engine
from . import cors
from .asgi import ConnectionGuard
from .errors import error_response, from_http_exception, internal_error
from .observer import EngineObserver, EventTrace
from .openai_routes import register_openai_routes
from .state import EXTENSION, ServerState, current_state, json_response, read_json

__all__ = ["ServerState", "create_app", "drain", "json_response", "read_json"]

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


def create_app(
    config: ServerConfig,
    engine: AsyncEngine,
    *,
    own_engine: bool = True,
    sse_ping_interval_s: float = 10.0,
) -> QuartTrio:
    """Build the app. With own_engine the app's lifespan nursery runs the engine (the
    `hypercorn -k trio mlctrio.app:app` path); otherwise the caller's nursery does (`mlctrio
    serve`, tests)."""
    app = QuartTrio("mlctrio")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # we enforce our own deadline; never cut streams
    app.config["BODY_TIMEOUT"] = 60
    metrics = Metrics(model_name=config.model_name, vllm_aliases=config.vllm_metrics)
    trace = EventTrace(config.trace_buffer_size) if config.enable_tracing else None
    engine._observer = EngineObserver(metrics, trace)
    app.extensions[EXTENSION] = ServerState(config, engine, metrics, trace, sse_ping_interval_s)
    app.asgi_app = ConnectionGuard(app.asgi_app, config.max_body_bytes)  # type: ignore[method-assign,assignment,arg-type]

    if own_engine:

        @app.before_serving
        async def _start_engine() -> None:
            # start_soon, not start: Hypercorn serves (/health 503) while the model loads.
            app.nursery.start_soon(serve_engine, engine)

        @app.after_serving
        async def _stop_engine() -> None:
            engine.state = EngineState.DRAINING
            engine.abort_all(AbortReason.SHUTDOWN)
            stop_engine(engine)

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


async def health() -> Response:
    status = current_state().engine.state
    code = 200 if status is EngineState.READY else 503
    return json_response({"status": status.value}, code)


async def metrics_route() -> Response:
    body = current_state().metrics.render()
    return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(state: ServerState) -> dict[str, Any]:
    info = state.model_info()
    return {
        "id": state.model_name,
        "object": "model",
        "created": info.created,
        "owned_by": "mlctrio",
        "root": state.config.model,
        "max_model_len": info.context_window_size,
    }


async def list_models() -> Response:
    return json_response({"object": "list", "data": [_model_card(current_state())]})


class ModelIdConverter(PathConverter):
    """A model id in a URL path: anything, slashes included, even a leading or a doubled one
    (`org/name`, `/models/llama`, `mock://echo`; the SDK sends them percent-encoded, and the
    server decodes %2F before routing). werkzeug's `path` refuses a leading slash, and its slash
    merging would redirect `/v1/models//models/llama` elsewhere: hence `merge_slashes=False`."""

    regex = ".+"
    part_isolating = False  # the id spans path segments


async def get_model(model: str) -> Response:
    state = current_state()
    state.check_model(model)
    return json_response(_model_card(state))


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
    """Stop taking requests, let in-flight ones finish up to timeout_s, abort the rest."""
    engine = state.engine
    engine.state = EngineState.DRAINING
    with trio.move_on_after(timeout_s):
        await engine.wait_idle()
    if engine.num_in_flight:
        log.warning("shutdown: aborting %d unfinished request(s)", engine.num_in_flight)
        engine.abort_all(AbortReason.SHUTDOWN)
        with trio.move_on_after(5):
            await engine.wait_idle()
