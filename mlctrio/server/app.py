"""The Quart-Trio application: hooks (auth, CORS, errors, limits) and the small routes.

The OpenAI generation routes live in server/openai_routes.py. `create_app` knows the engine only
through AsyncEngine (service.py): nothing here imports runtime/, models/ or tvm.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..config import ServerConfig
from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestError,
    ServiceUnavailableError,
)
from ..metrics import Metrics
from ..service import AsyncEngine, EngineState, ModelInfo, serve_engine, stop_engine
from . import cors
from .errors import error_response, from_http_exception, internal_error
from .observer import EngineObserver, EventTrace
from .sse import dumps

log = logging.getLogger("mlctrio.server")

OPEN_ROUTES = frozenset({"/health"})


@attrs.define(eq=False)
class ServerState:
    """Everything the routes share; one per app, passed in (no globals)."""

    config: ServerConfig
    engine: AsyncEngine
    metrics: Metrics
    trace: EventTrace | None
    sse_ping_interval_s: float = 10.0

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def model_info(self) -> ModelInfo:
        info = self.engine.info
        if info is None or self.engine.state is EngineState.LOADING:
            raise ServiceUnavailableError(
                "The model is still loading; try again later.", headers={"Retry-After": "5"}
            )
        return info

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                param="model",
            )


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status=status, content_type="application/json")


async def read_json() -> Any:
    """The request body as JSON; 400 for a wrong content type or malformed JSON."""
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise InvalidRequestError(
            "Request body must be JSON with Content-Type: application/json "
            f"(got {mimetype or 'none'}).",
            code="invalid_content_type",
        )
    data = await request.get_data()
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}.",
            code="invalid_json",
        ) from None


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
    metrics = Metrics(model_name=config.model_name)
    trace = EventTrace(config.trace_buffer_size) if config.enable_tracing else None
    engine._observer = EngineObserver(metrics, trace)
    state = ServerState(config, engine, metrics, trace, sse_ping_interval_s)
    app.extensions["mlctrio"] = state
    keys = tuple(k.encode() for k in config.api_keys)

    if own_engine:

        @app.before_serving
        async def _start_engine() -> None:
            # start_soon, not start: Hypercorn serves (/health 503) while the model loads.
            app.nursery.start_soon(serve_engine, engine)

        @app.after_serving
        async def _stop_engine() -> None:
            engine.state = EngineState.DRAINING
            engine.abort_all("shutdown")
            stop_engine(engine)

    @app.before_request
    async def _auth_and_cors() -> Response | None:
        preflight = cors.preflight(config)
        if preflight is not None:
            return preflight
        if keys and request.path not in OPEN_ROUTES and request.method != "OPTIONS":
            _check_api_key(keys)
        return None

    @app.after_request
    async def _cors_headers(response: Response) -> Response:
        cors.decorate(config, response)
        return response

    @app.errorhandler(RequestError)
    async def _request_error(exc: RequestError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        return error_response(from_http_exception(exc))

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        return internal_error(exc)

    @app.get("/health")
    async def health() -> Response:
        status = engine.state
        code = 200 if status is EngineState.READY else 503
        return json_response({"status": status.value}, code)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        info = state.model_info()
        return {
            "id": state.model_name,
            "object": "model",
            "created": info.created,
            "owned_by": "mlctrio",
            "root": config.model,
            "max_model_len": info.context_window_size,
        }

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:model>")
    async def get_model(model: str) -> Response:
        state.check_model(model)
        return json_response(model_card())

    @app.get("/openapi.json")
    async def openapi() -> Response:
        from ..protocol.openapi import openapi_document

        return json_response(
            openapi_document(
                api_key_required=bool(config.api_keys),
                extra_paths=_DEBUG_PATHS if config.enable_debug else None,
            )
        )

    if config.enable_debug:

        @app.post("/debug/dump_event_trace")
        async def dump_event_trace() -> Response:
            if trace is None:
                raise InvalidRequestError(
                    "Event tracing is off: start the server with --enable-tracing.",
                    code="tracing_disabled",
                )
            return json_response(trace.dump())

        @app.get("/debug/config")
        async def debug_config() -> Response:
            info = state.model_info()
            return json_response(
                {
                    "server": attrs.asdict(config, value_serializer=_jsonable),
                    "engine": dict(info.config),
                }
            )

    from .openai_routes import register_openai_routes

    register_openai_routes(app, state)
    return app


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
        engine.abort_all("shutdown")
        with trio.move_on_after(5):
            await engine.wait_idle()
