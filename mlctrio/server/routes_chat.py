"""POST /v1/chat/completions: from the request to engine requests, and the chat response shapes.

Rules: the engine stream is submitted (admission included) synchronously right before the
response is returned, so a refusal is an error response before any byte and a 200 always ends
with [DONE]; the streaming loop itself is streaming.stream_events, shared with completions. A
thinking model's text is split into reasoning_content and content (server/reasoning.py) before
the tool-call parser sees it, so calls are only ever parsed from the content.
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
    TokenLogprob,
    Usage,
)
from ..protocol.chat import ChatCompletionRequest
from ..protocol.openai import parse_chat_request
from . import generation as g
from . import prompts, tools
from .reasoning import ChoiceThinking, ThinkMode, content_or_null, reasoning_tokens, think_mode
from .sse import DONE, event
from .state import ServerState, json_response, read_request
from .streaming import EndsWithDone, collect, deadline_for, in_thread, streamed_response


async def chat_completions() -> Response:
    arrival = time.monotonic()
    state, req, info = await read_request(parse_chat_request)
    chat = await prepare_chat(state, info, req)
    prompt, params = chat.prompt, chat.params
    call_format = info.tool_call_format if tools.tool_mode(req) else None
    head = g.ResponseHead.new("chatcmpl", "chat.completion", state.model_name)
    gen = GenerationRequest(head.id, tuple(prompt), params, arrival)
    deadline = deadline_for(state)
    if not req.stream:
        outputs = await collect(state, [gen], deadline)
        return json_response(_whole(head, req, outputs, params.n, call_format, chat.think))
    writer = ChatWriter(head, params.n, req.include_usage, call_format, len(prompt), chat.think)
    stream = state.engine.submit([gen])  # admitted and submitted in one step: no await between
    return streamed_response(state, stream, writer, deadline)


@attrs.frozen
class PreparedChat:
    """A chat request ready to submit: prompt tokens, sampling parameters, and how its replies
    are split into reasoning and content (None: not at all; server/reasoning.py)."""

    prompt: list[int]
    params: SamplingParams
    think: ThinkMode | None


async def prepare_chat(
    state: ServerState, info: ModelInfo, req: ChatCompletionRequest
) -> PreparedChat:
    """The prompt tokens and sampling parameters of a chat request: its output constraint
    (compiled off the loop), the rendered and tokenized template, the context check. Shared with
    the Responses route (routes_responses.py), which maps its request onto a chat request."""
    constraint = await tools.chat_constraint(req, info, state.model_name)
    template = info.chat_template
    template_tools = prompts.tools_for_template(req)
    text, prompt = await in_thread(
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
    think = think_mode(state.config.reasoning_parser, template, text, constraint)
    return PreparedChat(prompt, params, think)


def _whole(
    head: g.ResponseHead,
    req: ChatCompletionRequest,
    outputs: list[RequestOutput],
    n: int,
    call_format: str | None,
    think: ThinkMode | None,
) -> dict[str, Any]:
    choices = [g.ChoiceAccumulator(i) for i in range(n)]
    thinking = [think.choice() for _ in range(n)] if think is not None else None
    for output in outputs:
        for delta in output.deltas:
            choices[delta.index].add(delta)
            if thinking is not None:
                final = delta.finish_reason is not None
                thinking[delta.index].push(delta.text, len(delta.token_ids), final)
    body = g.chat_completion_json(
        head, choices, outputs[-1].usage, bool(req.logprobs), reasoning_tokens(thinking)
    )
    for k, (choice, acc) in enumerate(zip(body["choices"], choices, strict=True)):
        thought = thinking[k] if thinking is not None else None
        content = thought.content if thought is not None else "".join(acc.text)
        if call_format is not None:
            choice.update(tools.ToolOutput.whole(content, call_format, acc.finish_reason or "stop"))
        else:
            choice["message"]["content"] = content
        message = choice["message"]
        if thought is not None and thought.thought:
            message["content"] = content_or_null(message["content"] or "", thought)
            message["reasoning_content"] = thought.reasoning
    return body


@attrs.define
class ChatWriter(EndsWithDone):
    """The chat.completion.chunk events of one streamed chat completion. Each delta's text goes
    through the choice's reasoning split first (reasoning_content chunks), then its content
    through the tool-call parser, if any: reasoning and content are never mixed in one chunk."""

    head: g.ResponseHead
    n: int
    include_usage: bool
    call_format: str | None
    num_prompt_tokens: int
    think: ThinkMode | None = None
    parsers: list[tools.ToolOutput] | None = None
    thinking: list[ChoiceThinking] | None = None
    usage: Usage = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        h = self.head
        self.head = g.ResponseHead(h.id, "chat.completion.chunk", h.created, h.model)
        if self.call_format is not None:
            self.parsers = [tools.ToolOutput(self.call_format) for _ in range(self.n)]
        if self.think is not None:
            self.thinking = [self.think.choice() for _ in range(self.n)]
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
            events.extend(self._delta_chunks(d))
        return events

    def closing(self) -> list[bytes]:
        usage = (
            [event(g.usage_chunk(self.head, self.usage, reasoning_tokens(self.thinking)))]
            if self.include_usage
            else []
        )
        return [*usage, DONE]

    def _delta_chunks(self, d: ChoiceDelta) -> list[bytes]:
        """The chunks of one delta: its reasoning (carrying the delta's logprobs), then its
        content or tool calls (the logprobs, when no reasoning chunk took them)."""
        text, logprobs, out = d.text, d.logprobs, []
        if self.thinking is not None:
            split = self.thinking[d.index].push(text, len(d.token_ids), d.finish_reason is not None)
            if split.reasoning:
                out.append(
                    self._chunk(d.index, {"reasoning_content": split.reasoning}, logprobs=logprobs)
                )
                logprobs = None
            text = split.content
        if self.parsers is not None:
            out.extend(self._tool_chunks(d, text, logprobs, self.parsers[d.index]))
        elif text or d.finish_reason or logprobs:
            out.append(
                self._chunk(
                    d.index,
                    {"content": text} if text else {},
                    finish_reason=d.finish_reason,
                    logprobs=logprobs,
                )
            )
        return out

    def _tool_chunks(
        self,
        d: ChoiceDelta,
        text: str,
        logprobs: tuple[TokenLogprob, ...] | None,
        parser: tools.ToolOutput,
    ) -> list[bytes]:
        """Chunks for the content of one delta of a choice whose text may hold tool calls:
        content and tool-call deltas are never mixed in one chunk; the finish chunk says
        tool_calls if any came."""
        content, calls = parser.push(text, d.finish_reason is not None)
        out = []
        if content or logprobs:
            out.append(
                self._chunk(d.index, {"content": content} if content else {}, logprobs=logprobs)
            )
        if calls:
            out.append(self._chunk(d.index, {"tool_calls": calls}))
        if d.finish_reason is not None:
            out.append(
                self._chunk(d.index, {}, finish_reason=parser.finish_reason(d.finish_reason))
            )
        return out
