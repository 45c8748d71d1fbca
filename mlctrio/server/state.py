"""What every route shares, at the bottom of the server package: `ServerState` and JSON in/out.

Rules: this module imports no other route module (routes import it, never the reverse), so the
server package has no import cycle. Handlers find the state through the app
(`current_state()`), never through a closure or a global. A server may serve several models
(`--additional-models`), each a `ServedModel` with its own engine: a route that takes a `model`
field reads it with `read_request(parse)`, which gives `state.for_model(req.model)` (the state as
that model's route sees it: its engine, name and info; None names the main model) and the
model's info; `state.engine` and `state.model_name` are the main model's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
from quart import Response, current_app, request

from ..config import ServerConfig
from ..errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from ..metrics import Metrics
from ..service import AsyncEngine, EngineState, ModelInfo
from .observer import EventTrace
from .sse import dumps

EXTENSION = "mlctrio"

#: Deepest JSON nesting a request body may have. Real requests (JSON schemas of tools included)
#: stay far below; the limit keeps every recursive walk of the body (validation, templates,
#: grammar compilation) far from Python's recursion limit.
MAX_JSON_DEPTH = 64


@attrs.define(eq=False)
class ServedModel:
    """One model this server serves: the name clients send, the model string it was loaded
    from, and its own engine (worker thread, KV cache, metrics children)."""

    name: str
    source: str
    engine: AsyncEngine

    def info(self) -> ModelInfo:
        """The model's info; 503 (Retry-After) while it loads."""
        info = self.engine.info
        if info is None or self.engine.state is EngineState.LOADING:
            raise ServiceUnavailableError(
                f"The model `{self.name}` is still loading; try again later.",
                headers={"Retry-After": "5"},
            )
        return info


@attrs.define(eq=False)
class ServerState:
    """Everything the routes share; one per app (in `app.extensions`, no globals)."""

    config: ServerConfig
    engine: AsyncEngine  # the main model's
    metrics: Metrics
    trace: EventTrace | None
    sse_ping_interval_s: float = 10.0
    #: Every served model by name, the main one first (built from `engine` when left empty).
    models: dict[str, ServedModel] = attrs.field(factory=dict)
    _views: dict[str, ServerState] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.models:
            main = ServedModel(self.config.model_name, self.config.model, self.engine)
            self.models = {main.name: main}

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def main(self) -> ServedModel:
        return self.models[self.model_name]

    def served(self, model: str | None) -> ServedModel:
        """The model a request names (None: the main one); 404 model_not_found otherwise."""
        if model is None:
            return self.main
        found = self.models.get(model)
        if found is None:
            names = ", ".join(f"`{name}`" for name in self.models)
            raise ModelNotFoundError(
                f"The model `{model}` does not exist. This server serves {names}.",
                param="model",
            )
        return found

    def for_model(self, model: str | None) -> ServerState:
        """This state as a route serving `model` sees it (None: the main model): `engine`,
        `model_name` and `model_info()` are that model's, all else is shared. 404 for an
        unknown name. Lets the generation routes take any served model unchanged."""
        served = self.served(model)
        if served.name == self.model_name:
            return self
        view = self._views.get(served.name)
        if view is None:
            config = attrs.evolve(
                self.config, model=served.source, served_model_name=served.name,
                additional_models=(),
            )  # fmt: skip
            view = attrs.evolve(self, config=config, engine=served.engine)
            self._views[served.name] = view
        return view

    def model_info(self) -> ModelInfo:
        """The main model's info; 503 while it loads."""
        return self.main.info()


def current_state() -> ServerState:
    """The state of the app serving the current request."""
    state: ServerState = current_app.extensions[EXTENSION]
    return state


class NamesModel(Protocol):
    """A parsed request body: every route's names the model it is for (None: the main one)."""

    @property
    def model(self) -> str | None: ...


R = TypeVar("R", bound=NamesModel)


async def read_request(parse: Callable[[Any], R]) -> tuple[ServerState, R, ModelInfo]:
    """The body parsed by `parse`, and the model it names: that model's view of the state
    (`ServerState.for_model`) and its info. 400 for a bad body, 404 for a model not served,
    503 while it loads."""
    req = parse(await read_json())
    state = current_state().for_model(req.model)
    return state, req, state.model_info()


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status=status, content_type="application/json")


async def read_json() -> Any:
    """The request body as JSON; 400 for a wrong content type, malformed or too deep JSON."""
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise InvalidRequestError(
            "Request body must be JSON with Content-Type: application/json "
            f"(got {mimetype or 'none'}).",
            code="invalid_content_type",
        )
    raw = await request.get_data()
    data = raw if isinstance(raw, bytes) else raw.encode()
    too_deep = InvalidRequestError(
        f"The JSON body of your request is nested deeper than {MAX_JSON_DEPTH} levels.",
        code="json_too_deep",
    )
    try:
        body = json.loads(data)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}.",
            code="invalid_json",
        ) from None
    # Fewer brackets than the limit (most bodies, however long) cannot nest deeper: skip the walk.
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    # A `\\uD800`-style escape without its pair parses into a str no tokenizer or UTF-8 encoder
    # takes; only bodies holding such an escape (rare) are walked.
    if _SURROGATE_ESCAPE.search(data) and (where := lone_surrogate_path(body)) is not None:
        raise InvalidRequestError(
            f"The JSON body of your request holds an unpaired UTF-16 surrogate escape at {where}: "
            "it is not valid Unicode text.",
            param=where,
            code="invalid_unicode",
        )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(value: Any) -> str | None:
    """The dotted path (`messages.0.content`) of the first string, key or value, that holds an
    unpaired surrogate (json.loads joins valid pairs, so any surrogate left is unpaired)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return child_path
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item))
    return None


def json_depth(value: Any) -> int:
    """How deeply JSON arrays and objects nest in `value` (iterative: no recursion limit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest
