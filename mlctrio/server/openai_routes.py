"""POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize.

One HTTP request = one `engine.generate()` block. Streaming and non-streaming responses go
through the same path; leaving the block early (client gone, deadline) aborts in the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
from quart import Response
from quart_trio import QuartTrio

from ..engine.types import ChoiceDelta, GenerationRequest, Usage
from ..errors import InvalidRequestError
from ..protocol.openai import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from . import generation as g
from . import prompts, tools
from .app import ServerState, json_response, read_json
from .sse import DONE, event
from .streaming import collect, deadline_for, in_thread, next_batch, sse_response


def register_openai_routes(app: QuartTrio, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        arrival = time.monotonic()
        req = parse_chat_request(await read_json())
        state.check_model(req.model)
        info = state.model_info()
        constraint = tools.output_constraint(req, info.tool_call_format, info.parallel_tool_calls)
        if constraint is not None:
            if info.check_constraint is None:
                raise InvalidRequestError(
                    f"The model {state.model_name} does not support constrained output "
                    "(response_format / tools).",
                    param="tools" if constraint.kind == "tools" else "response_format",
                )
            await in_thread(info.check_constraint, constraint)
        call_format = info.tool_call_format if tools.tool_mode(req) else None
        template = info.chat_template
        template_tools = prompts.tools_for_template(req)
        prompt = await in_thread(
            lambda: prompts.render_chat(req.messages, template_tools, template, info.tokenizer)
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
        head = g.ResponseHead.new("chatcmpl", "chat.completion", state.model_name)
        gen = GenerationRequest(head.id, tuple(prompt), params, arrival)
        deadline = deadline_for(state)
        if not req.stream:
            outputs = await collect(state, [gen], deadline)
            choices = [g.ChoiceAccumulator(i) for i in range(params.n)]
            for output in outputs:
                for delta in output.deltas:
                    choices[delta.index].add(delta)
            body = g.chat_completion_json(head, choices, outputs[-1].usage, bool(req.logprobs))
            if call_format is not None:
                for choice, acc in zip(body["choices"], choices, strict=True):
                    choice.update(
                        tools.ToolOutput.whole(
                            "".join(acc.text), call_format, acc.finish_reason or "stop"
                        )
                    )
            return json_response(body)
        state.engine.check_admission([gen])
        include_usage = req.include_usage
        return sse_response(_chat_stream(state, head, gen, include_usage, deadline, call_format))

    async def _chat_stream(
        state: ServerState,
        head: g.ResponseHead,
        gen: GenerationRequest,
        include_usage: bool,
        deadline: float,
        call_format: Any,
    ) -> AsyncIterator[bytes]:
        chunk = g.chat_chunk
        n = gen.params.n
        parsers = [tools.ToolOutput(call_format) for _ in range(n)] if call_format else None
        head = g.ResponseHead(head.id, "chat.completion.chunk", head.created, head.model)
        usage = Usage(len(gen.prompt_token_ids), 0)
        async with state.engine.generate([gen]) as stream:
            for i in range(n):
                yield event(
                    chunk(
                        head, i, {"role": "assistant", "content": ""}, include_usage=include_usage
                    )
                )
            while not (batch := await next_batch(stream, state, deadline)).done:
                events: list[bytes] = []
                for ready in batch.outputs:
                    usage = ready.usage
                    for d in ready.deltas:
                        if parsers is not None:
                            for body in _tool_chunks(head, d, parsers[d.index], include_usage):
                                events.append(event(body))
                        elif d.text or d.finish_reason or d.logprobs:
                            events.append(
                                event(
                                    chunk(
                                        head,
                                        d.index,
                                        {"content": d.text} if d.text else {},
                                        finish_reason=d.finish_reason,
                                        logprobs=d.logprobs,
                                        include_usage=include_usage,
                                    )
                                )
                            )
                events.append(batch.control)
                data = b"".join(events)
                if data:  # one write for everything that was ready
                    yield data
                if batch.end:
                    return
        if include_usage:
            yield event(g.usage_chunk(head, usage))
        yield DONE

    def _tool_chunks(
        head: g.ResponseHead, d: ChoiceDelta, parser: tools.ToolOutput, include_usage: bool
    ) -> list[dict[str, Any]]:
        """Chunks for one delta of a choice whose text may hold tool calls: content and tool-call
        deltas are never mixed in one chunk; the finish chunk says tool_calls if any came."""
        content, calls = parser.push(d.text, d.finish_reason is not None)
        out = []
        if content or d.logprobs:
            out.append(
                g.chat_chunk(
                    head,
                    d.index,
                    {"content": content} if content else {},
                    logprobs=d.logprobs,
                    include_usage=include_usage,
                )
            )
        if calls:
            out.append(
                g.chat_chunk(head, d.index, {"tool_calls": calls}, include_usage=include_usage)
            )
        if d.finish_reason is not None:
            out.append(
                g.chat_chunk(
                    head,
                    d.index,
                    {},
                    finish_reason=parser.finish_reason(d.finish_reason),
                    include_usage=include_usage,
                )
            )
        return out

    @app.post("/v1/completions")
    async def completions() -> Response:
        arrival = time.monotonic()
        req = parse_completion_request(await read_json())
        state.check_model(req.model)
        info = state.model_info()
        if req.echo and req.logprobs is not None:
            raise InvalidRequestError(
                "echo together with logprobs needs prompt logprobs, which this server does "
                "not compute.",
                param="echo",
            )
        prompt_ids: list[list[int]] = await in_thread(
            lambda: prompts.prompt_token_lists(req, info.tokenizer)
        )
        head = g.ResponseHead.new("cmpl", "text_completion", state.model_name)
        gens: list[GenerationRequest] = []
        for k, prompt in enumerate(prompt_ids):
            max_tokens = g.check_context(
                len(prompt),
                req.max_output_tokens,
                info.context_window_size,
                prompt_param="prompt",
                max_tokens_param="max_tokens",
            )
            params = g.sampling_params(
                req,
                max_tokens=max_tokens,
                tokenizer=info.tokenizer,
                logprobs=req.logprobs is not None,
                top_logprobs=req.logprobs or 0,
            )
            request_id = head.id if len(prompt_ids) == 1 else f"{head.id}-{k}"
            gens.append(GenerationRequest(request_id, tuple(prompt), params, arrival))
        n = gens[0].params.n
        index_of = {gen.request_id: k * n for k, gen in enumerate(gens)}
        echo = (
            [info.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
            if req.echo
            else None
        )
        deadline = deadline_for(state)
        if not req.stream:
            outputs = await collect(state, gens, deadline)
            acc: dict[int, g.ChoiceAccumulator] = {}
            usage: dict[str, Usage] = {}
            for output in outputs:
                base = index_of[output.request_id]
                usage[output.request_id] = output.usage
                for d in output.deltas:
                    acc.setdefault(base + d.index, g.ChoiceAccumulator(base + d.index)).add(d)
            choices = []
            for index in sorted(acc):
                c = acc[index]
                prefix = echo[index // n] if echo else ""
                choices.append(
                    g.completion_choice(
                        index,
                        prefix + "".join(c.text),
                        c.finish_reason,
                        c.logprobs if req.logprobs is not None else None,
                        len(prefix),
                    )
                )
            total = Usage(
                sum(u.prompt_tokens for u in usage.values()),
                sum(u.completion_tokens for u in usage.values()),
            )
            body = head.base()
            body["choices"] = choices
            body["usage"] = g.usage_json(total)
            return json_response(body)
        state.engine.check_admission(gens)
        include_usage = req.include_usage
        return sse_response(
            _completion_stream(
                state,
                head,
                gens,
                index_of,
                echo,
                req.logprobs is not None,
                include_usage,
                deadline,
            )
        )

    async def _completion_stream(
        state: ServerState,
        head: g.ResponseHead,
        gens: list[GenerationRequest],
        index_of: dict[str, int],
        echo: list[str] | None,
        want_logprobs: bool,
        include_usage: bool,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        n = gens[0].params.n
        usage = {gen.request_id: Usage(len(gen.prompt_token_ids), 0) for gen in gens}
        offsets: dict[int, int] = {}

        def choice_chunk(index: int, text: str, finish: str | None, lps: Any) -> bytes:
            body = head.base()
            body["choices"] = [
                g.completion_choice(
                    index, text, finish, lps if want_logprobs else None, offsets.get(index, 0)
                )
            ]
            if include_usage:
                body["usage"] = None
            offsets[index] = offsets.get(index, 0) + len(text)
            return event(body)

        async with state.engine.generate(gens) as stream:
            if echo is not None:
                for k, text in enumerate(echo):
                    for i in range(n):
                        yield choice_chunk(k * n + i, text, None, [] if want_logprobs else None)
            while not (batch := await next_batch(stream, state, deadline)).done:
                events: list[bytes] = []
                for ready in batch.outputs:
                    usage[ready.request_id] = ready.usage
                    base = index_of[ready.request_id]
                    for d in ready.deltas:
                        if d.text or d.finish_reason or d.logprobs:
                            events.append(
                                choice_chunk(
                                    base + d.index, d.text, d.finish_reason, d.logprobs or []
                                )
                            )
                events.append(batch.control)
                data = b"".join(events)
                if data:  # one write for everything that was ready
                    yield data
                if batch.end:
                    return
        if include_usage:
            total = Usage(
                sum(u.prompt_tokens for u in usage.values()),
                sum(u.completion_tokens for u in usage.values()),
            )
            yield event(g.usage_chunk(head, total))
        yield DONE

    @app.post("/tokenize")
    async def tokenize() -> Response:
        req = parse_tokenize_request(await read_json())
        state.check_model(req.model)
        info = state.model_info()
        tokens = await in_thread(lambda: prompts.tokenize(req, info.tokenizer, info.chat_template))
        return json_response(
            {"tokens": tokens, "count": len(tokens), "max_model_len": info.context_window_size}
        )

    @app.post("/detokenize")
    async def detokenize() -> Response:
        req = parse_detokenize_request(await read_json())
        state.check_model(req.model)
        info = state.model_info()
        vocab = info.tokenizer.vocab_size
        for i, token in enumerate(req.tokens):
            if not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"Token id {token} is outside the vocabulary (0..{vocab - 1}).",
                    param=f"tokens.{i}",
                )
        text = await in_thread(lambda: info.tokenizer.decode(req.tokens))
        return json_response({"prompt": text})
