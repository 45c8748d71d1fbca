"""The routes a load balancer reads: SGLang's worker API, as the SGLang Model Gateway uses it.

`sglang-router` (0.3.2) registers a worker once /health answers 200, then reads
`GET /server_info` and `GET /model_info` for the worker's model id (`served_model_name`) and
data-parallel size (`dp_size`), and, with the power_of_two policy, polls `GET /get_load` for
each worker's load (`num_tokens`, summed over the worker's `dp_rank`s). SGLang's older names
(`/get_server_info`, `/get_model_info`) answer the same.

Rules: answers describe this server only: its main model (with --additional-models the others
are in /v1/models) and its load summed over every model. `model_path` is left out on purpose:
the gateway would try to download a tokenizer from the Hugging Face hub by that name (it needs
none to route HTTP workers). These routes need the API key when one is set, as every route but
/health.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from ..service import AsyncEngine
from .state import ServerState, current_state, json_response


def _version() -> str:
    try:
        return f"mlctrio {version('mlctrio')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "mlctrio"


def _engine_info(state: ServerState) -> dict[str, Any]:
    info = state.engine.info
    if info is None:  # still loading: the gateway only asks once /health is 200
        return {}
    return {
        "context_length": info.context_window_size,
        "max_running_requests": info.config.get("max_num_sequence"),
        "page_size": info.config.get("kv_page_size"),
    }


async def server_info() -> Response:
    state = current_state()
    return json_response(
        {
            "served_model_name": state.model_name,
            "dp_size": 1,
            "version": _version(),
            "status": state.engine.state.value,
            **_engine_info(state),
        }
    )


async def model_info() -> Response:
    state = current_state()
    return json_response(
        {
            "served_model_name": state.model_name,
            "is_generation": True,
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }
    )


def _tokens_held(engine: AsyncEngine) -> int:
    stats = engine.stats()
    info = engine.info
    if stats is None or info is None:
        return 0
    page_size = int(info.config.get("kv_page_size") or 1)
    held_pages = int(stats.total_pages - stats.free_pages - stats.num_cached_pages)
    return max(0, held_pages) * page_size


def load(state: ServerState) -> dict[str, int]:
    """This server's load in SGLang's shape: requests in flight, queued, KV tokens held (summed
    over every served model's engine: they share the machine)."""
    engines = [served.engine for served in state.models.values()]
    return {
        "dp_rank": 0,
        "num_reqs": sum(e.num_in_flight for e in engines),
        "num_waiting_reqs": sum(e.num_queued for e in engines),
        "num_tokens": sum(_tokens_held(e) for e in engines),
    }


async def get_load() -> Response:
    return json_response([load(current_state())])


def register_router_routes(app: QuartTrio) -> None:
    for path in ("/server_info", "/get_server_info"):
        app.add_url_rule(path, view_func=server_info, methods=["GET"])
    for path in ("/model_info", "/get_model_info"):
        app.add_url_rule(path, view_func=model_info, methods=["GET"])
    app.add_url_rule("/get_load", view_func=get_load, methods=["GET"])
