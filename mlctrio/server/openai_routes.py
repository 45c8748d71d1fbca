"""The OpenAI-style routes: registration, and the small ones (/tokenize, /detokenize).

Rules: handlers are module-level functions that find the server state through the app
(`state.read_request()`, `state.current_state()`); the generation routes live in routes_chat.py,
routes_completions.py and routes_responses.py; /v1/embeddings in routes_embeddings.py.
Nothing here imports server/app.py (no cycle).
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ..errors import InvalidRequestError
from ..protocol.openai import parse_detokenize_request, parse_tokenize_request
from . import prompts
from .routes_chat import chat_completions
from .routes_completions import completions
from .routes_embeddings import embeddings
from .routes_page import register_chat_page
from .routes_responses import responses
from .routes_router import register_router_routes
from .state import json_response, read_request
from .streaming import in_thread


async def tokenize() -> Response:
    _, req, info = await read_request(parse_tokenize_request)
    tokens = await in_thread(lambda: prompts.tokenize(req, info.tokenizer, info.chat_template))
    return json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": info.context_window_size}
    )


async def detokenize() -> Response:
    _, req, info = await read_request(parse_detokenize_request)
    vocab = info.tokenizer.vocab_size
    for i, token in enumerate(req.tokens):
        if not 0 <= token < vocab:
            raise InvalidRequestError(
                f"Token id {token} is outside the vocabulary (0..{vocab - 1}).",
                param=f"tokens.{i}",
            )
    text = await in_thread(lambda: info.tokenizer.decode(req.tokens))
    return json_response({"prompt": text})


def register_openai_routes(app: QuartTrio) -> None:
    app.add_url_rule("/v1/chat/completions", view_func=chat_completions, methods=["POST"])
    app.add_url_rule("/v1/completions", view_func=completions, methods=["POST"])
    app.add_url_rule("/v1/responses", view_func=responses, methods=["POST"])
    app.add_url_rule("/v1/embeddings", view_func=embeddings, methods=["POST"])
    app.add_url_rule("/tokenize", view_func=tokenize, methods=["POST"])
    app.add_url_rule("/detokenize", view_func=detokenize, methods=["POST"])
    register_router_routes(app)  # /server_info, /model_info, /get_load for sglang-router
    register_chat_page(app)
