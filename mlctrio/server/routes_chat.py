"""POST /v1/chat/completions: from the request to engine requests, and the chat response shapes.

Rules: the engine stream is submitted (admission included) synchronously right before the
response is returned, so a refusal is an error response before any byte and a 200 always ends
with [DONE]; the streaming loop itself is streaming.stream_events, shared with completions.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from quart import Response

from ..engine.model_info import ModelInfo
from ..engine.types import (
    ChoiceDelta,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    Usage,
)
from ..protocol.chat import ChatCompletionRequest
from ..protocol.openai import parse_chat_request
from . import generation as g
from . import prompts, tools
from .sse import DONE, event
from .state import ServerState, json_response, read_request
from .streaming import EndsWithDone, collect, deadline_for, in_thread, streamed_response


async def chat_completions() -> Response:
    arrival = time.monotonic()
    state, req, info = await read_request(parse_chat_request)
    prompt, params = await prepare_chat(state, info, req)
    call_format = info.tool_call_format if tools.tool_mode(req) else None
    head = g.ResponseHead.new("chatcmpl", "chat.completion", state.model_name)
    gen = GenerationRequest(head.id, tuple(prompt), params, arrival)
    deadline = deadline_for(state)
    if not req.stream:
        outputs = await collect(state, [gen], deadline)
        return json_response(_whole(head, req, outputs, params.n, call_format))
    writer = ChatWriter(head, params.n, req.include_usage, call_format, len(prompt))
    stream = state.engine.submit([gen])  # admitted and submitted in one step: no await between
    return streamed_response(state, stream, writer, deadline)


async def prepare_chat(
    state: ServerState, info: ModelInfo, req: ChatCompletionRequest
) -> tuple[list[int], SamplingParams]:
    """The prompt tokens and sampling parameters of a chat request: its output constraint
    (compiled off the loop), the rendered and tokenized template, the context check. Shared with
    the Responses route (routes_responses.py), which maps its request onto a chat request."""
    constraint = await tools.chat_constraint(req, info, state.model_name)
    template = info.chat_template
    template_tools = prompts.tools_for_template(req)
    prompt: list[int] = await in_thread(
        lambda: prompts.render_chat(
            req.messages,
            template_tools,
            template,
            info.tokenizer,
            add_generation_prompt=req.add_generation_prompt is not False,
            template_kwargs=req.template_kwargs(),
            context_window=info.context_window_size,
        )
    )
    max_tokens = g.check_context(
        len(prompt),
        req.max_output_tokens,
        info.context_window_size,
        prompt_param="messages",
        max_tokens_param=(
            "max_completion_tokens"
            if req.max_output_tokens == req.max_completion_tokens
            else "max_tokens"
        ),
    )
    params = g.sampling_params(
        req,
        max_tokens=max_tokens,
        tokenizer=info.tokenizer,
        template_stop=template.stop_strings,
        template_stop_ids=template.stop_token_ids,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )
    if constraint is not None:
        params = attrs.evolve(params, constraint=constraint)
    return prompt, params


def _whole(
    head: g.ResponseHead,
    req: ChatCompletionRequest,
    outputs: list[RequestOutput],
    n: int,
    call_format: str | None,
) -> dict[str, Any]:
    choices = [g.ChoiceAccumulator(i) for i in range(n)]
    for output in outputs:
        for delta in output.deltas:
            choices[delta.index].add(delta)
    body = g.chat_completion_json(head, choices, outputs[-1].usage, bool(req.logprobs))
    if call_format is not None:
        for choice, acc in zip(body["choices"], choices, strict=True):
            choice.update(
                tools.ToolOutput.whole("".join(acc.text), call_format, acc.finish_reason or "stop")
            )
    return body


@attrs.define
class ChatWriter(EndsWithDone):
    """The chat.completion.chunk events of one streamed chat completion."""

    head: g.ResponseHead
    n: int
    include_usage: bool
    call_format: str | None
    num_prompt_tokens: int
    parsers: list[tools.ToolOutput] | None = None
    usage: Usage = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        h = self.head
        self.head = g.ResponseHead(h.id, "chat.completion.chunk", h.created, h.model)
        if self.call_format is not None:
            self.parsers = [tools.ToolOutput(self.call_format) for _ in range(self.n)]
        self.usage = Usage(self.num_prompt_tokens, 0)

    def _chunk(self, index: int, delta: dict[str, Any], **kwargs: Any) -> bytes:
        return event(
            g.chat_chunk(self.head, index, delta, include_usage=self.include_usage, **kwargs)
        )

    def opening(self) -> list[bytes]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)]

    def output_events(self, output: RequestOutput) -> list[bytes]:
        self.usage = output.usage
        events: list[bytes] = []
        for d in output.deltas:
            if self.parsers is not None:
                events.extend(self._tool_chunks(d, self.parsers[d.index]))
            elif d.text or d.finish_reason or d.logprobs:
                events.append(
                    self._chunk(
                        d.index,
                        {"content": d.text} if d.text else {},
                        finish_reason=d.finish_reason,
                        logprobs=d.logprobs,
                    )
                )
        return events

    def closing(self) -> list[bytes]:
        usage = [event(g.usage_chunk(self.head, self.usage))] if self.include_usage else []
        return [*usage, DONE]

    def _tool_chunks(self, d: ChoiceDelta, parser: tools.ToolOutput) -> list[bytes]:
        """Chunks for one delta of a choice whose text may hold tool calls: content and tool-call
        deltas are never mixed in one chunk; the finish chunk says tool_calls if any came."""
        content, calls = parser.push(d.text, d.finish_reason is not None)
        out = []
        if content or d.logprobs:
            out.append(
                self._chunk(d.index, {"content": content} if content else {}, logprobs=d.logprobs)
            )
        if calls:
            out.append(self._chunk(d.index, {"tool_calls": calls}))
        if d.finish_reason is not None:
            out.append(
                self._chunk(d.index, {}, finish_reason=parser.finish_reason(d.finish_reason))
            )
        return out
