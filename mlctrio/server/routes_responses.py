"""POST /v1/responses (stateless): the chat pipeline behind OpenAI's Responses API.

Rules: the request is validated (protocol/responses.py) and mapped onto the equivalent chat
request, so template, tools, constraints and sampling are exactly the chat route's; a 400 from
that pipeline names the Responses field (`input`, `text.format`, `max_output_tokens`). As for
chat, the engine stream is submitted synchronously right before the response is returned; the
output and its events (a thinking model's think block as a reasoning item first) come from
responses_events.OutputBuilder, streamed through
streaming.stream_events (no `[DONE]`: a stream ends with response.completed, .incomplete or
.failed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from quart import Response

from ..engine.types import GenerationRequest, SamplingParams, Usage
from ..errors import InvalidRequestError
from ..protocol.openai import to_json
from ..protocol.responses import ResponsesRequest, TextConfig, parse_responses_request
from ..protocol.responses_chat import to_chat_request
from ..protocol.responses_output import ResponseObject, new_item_id
from . import tools
from .responses_events import OutputBuilder, ResponsesWriter
from .routes_chat import prepare_chat
from .state import ServerState, json_response, read_request
from .streaming import collect, deadline_for, streamed_response

#: Chat parameter names as the Responses API calls them, for errors from the chat pipeline.
_PARAMS: Final = {
    "messages": "input",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
}


@contextmanager
def _responses_params() -> Iterator[None]:
    try:
        yield
    except InvalidRequestError as exc:
        if exc.param in _PARAMS:
            exc.param = _PARAMS[exc.param]
        raise


async def responses() -> Response:
    arrival = time.monotonic()
    state, req, info = await read_request(parse_responses_request)
    chat = to_chat_request(req)
    with _responses_params():
        prepared = await prepare_chat(state, info, chat)
    prompt, params, think = prepared.prompt, prepared.params, prepared.think
    call_format = info.tool_call_format if tools.tool_mode(chat) else None
    parallel = (
        info.parallel_tool_calls if req.parallel_tool_calls is None else req.parallel_tool_calls
    )
    thinking = think.choice() if think is not None else None
    builder = OutputBuilder(_head(state, req, params, parallel), call_format, thinking)
    gen = GenerationRequest(builder.head.id, tuple(prompt), params, arrival)
    deadline = deadline_for(state)
    if not req.stream:
        usage = Usage(len(prompt), 0)
        for output in await collect(state, [gen], deadline):
            usage = output.usage
            for d in output.deltas:
                builder.push(d.text, d.finish_reason, len(d.token_ids))
        builder.finish(usage)
        assert builder.result is not None
        return json_response(to_json(builder.result))
    writer = ResponsesWriter(builder, Usage(len(prompt), 0))
    stream = state.engine.submit([gen])  # admitted and submitted in one step: no await between
    return streamed_response(state, stream, writer, deadline)


def _head(
    state: ServerState, req: ResponsesRequest, params: SamplingParams, parallel: bool
) -> ResponseObject:
    """The response before any output: what every lifecycle event repeats."""
    return ResponseObject(
        id=new_item_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        model=state.model_name,
        parallel_tool_calls=parallel,
        reasoning=req.reasoning,
        temperature=params.temperature,
        text=TextConfig(format=req.text_format),
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
        tools=req.tools or (),
        top_p=params.top_p,
        user=req.user,
        metadata=req.metadata or {},
    )
