"""POST /v1/completions: from the request to engine requests (one per prompt), and the
text_completion response shapes.

Rules: as for chat (server/routes_chat.py): submission is synchronous right before the response is
returned, and the streaming loop is streaming.stream_events.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from quart import Response

from ..engine.model_info import ModelInfo
from ..engine.types import GenerationRequest, RequestOutput, TokenLogprob, Usage
from ..protocol.openai import parse_completion_request
from . import generation as g
from . import prompts, tools
from .sse import DONE, event
from .state import json_response, read_request
from .streaming import EndsWithDone, collect, deadline_for, in_thread, streamed_response


async def completions() -> Response:
    arrival = time.monotonic()
    state, req, info = await read_request(parse_completion_request)
    guided = tools.guided_constraint(req)
    if guided is not None:
        await tools.check_constraint(info, state.model_name, *guided, rename=True)
    prompt_ids: list[list[int]] = await in_thread(
        lambda: prompts.prompt_token_lists(req, info.tokenizer, info.context_window_size)
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
        if req.echo and req.logprobs is not None:  # the echoed prompt carries logprobs too
            params = attrs.evolve(params, prompt_logprobs=req.logprobs)
        if guided is not None:
            params = attrs.evolve(params, constraint=guided[0])
        request_id = head.id if len(prompt_ids) == 1 else f"{head.id}-{k}"
        gens.append(GenerationRequest(request_id, tuple(prompt), params, arrival))
    n = gens[0].params.n
    index_of = {gen.request_id: k * n for k, gen in enumerate(gens)}
    echo = (
        [
            Echo(info.tokenizer.decode(p, skip_special_tokens=False), _token_text(info, p[0]))
            for p in prompt_ids
        ]
        if req.echo
        else None
    )
    want_logprobs = req.logprobs is not None
    deadline = deadline_for(state)
    if not req.stream:
        outputs = await collect(state, gens, deadline)
        return json_response(_whole(head, outputs, index_of, n, echo, want_logprobs))
    writer = CompletionWriter(head, gens, index_of, echo, want_logprobs, req.include_usage)
    stream = state.engine.submit(gens)  # admitted and submitted in one step: no await between
    return streamed_response(state, stream, writer, deadline)


@attrs.frozen
class Echo:
    """A prompt echoed before its completion: its text, and its first token's text (the one
    prompt token without a logprob, listed first when logprobs are asked)."""

    text: str
    first_token: str

    def logprobs(self, output: RequestOutput) -> list[TokenLogprob | str]:
        """The legacy logprob items of the echoed prompt, from the engine's prompt logprobs."""
        found = output.prompt_logprobs or (None,)
        return [self.first_token, *(lp for lp in found[1:] if lp is not None)]


def _token_text(info: ModelInfo, token_id: int) -> str:
    return info.tokenizer.token_bytes(token_id).decode("utf-8", "replace")


def _total(usage: dict[str, Usage]) -> Usage:
    return Usage(
        sum(u.prompt_tokens for u in usage.values()),
        sum(u.completion_tokens for u in usage.values()),
    )


def _whole(
    head: g.ResponseHead,
    outputs: list[RequestOutput],
    index_of: dict[str, int],
    n: int,
    echo: list[Echo] | None,
    want_logprobs: bool,
) -> dict[str, Any]:
    acc: dict[int, g.ChoiceAccumulator] = {}
    usage: dict[str, Usage] = {}
    echo_lps: dict[int, list[TokenLogprob | str]] = {}  # base index -> the prompt's items
    for output in outputs:
        base = index_of[output.request_id]
        usage[output.request_id] = output.usage
        if echo and want_logprobs and output.prompt_logprobs is not None:
            echo_lps[base] = echo[base // n].logprobs(output)
        for d in output.deltas:
            acc.setdefault(base + d.index, g.ChoiceAccumulator(base + d.index)).add(d)
    choices = []
    for index in sorted(acc):
        c = acc[index]
        prefix = echo[index // n].text if echo else ""
        lps: list[TokenLogprob | str] | None = None
        if want_logprobs:
            lps = [*echo_lps.get(index - index % n, []), *(c.logprobs or [])]
        choices.append(g.completion_choice(index, prefix + "".join(c.text), c.finish_reason, lps))
    body = head.base()
    body["choices"] = choices
    body["usage"] = g.usage_json(_total(usage))
    return body


@attrs.define
class CompletionWriter(EndsWithDone):
    """The text_completion events of one streamed completion (all its prompts and choices)."""

    head: g.ResponseHead
    gens: list[GenerationRequest]
    index_of: dict[str, int]
    echo: list[Echo] | None
    want_logprobs: bool
    include_usage: bool
    usage: dict[str, Usage] = attrs.field(init=False)
    offsets: dict[int, int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.usage = {gen.request_id: Usage(len(gen.prompt_token_ids), 0) for gen in self.gens}

    def _choice(self, index: int, text: str, finish: str | None, lps: Any) -> bytes:
        body = self.head.base()
        body["choices"] = [
            g.completion_choice(
                index,
                text,
                finish,
                lps if self.want_logprobs else None,
                self.offsets.get(index, 0),
            )
        ]
        if self.include_usage:
            body["usage"] = None
        self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return event(body)

    def opening(self) -> list[bytes]:
        """The echoed prompts, at once; with logprobs they wait for the engine's (the first
        output of each request)."""
        if self.echo is None or self.want_logprobs:
            return []
        n = self.gens[0].params.n
        return [
            self._choice(k * n + i, echo.text, None, None)
            for k, echo in enumerate(self.echo)
            for i in range(n)
        ]

    def output_events(self, output: RequestOutput) -> list[bytes]:
        self.usage[output.request_id] = output.usage
        base = self.index_of[output.request_id]
        events = []
        if self.echo is not None and self.want_logprobs and output.prompt_logprobs is not None:
            echo = self.echo[base // self.gens[0].params.n]
            items = echo.logprobs(output)
            events += [
                self._choice(base + i, echo.text, None, items) for i in range(self.gens[0].params.n)
            ]
        return events + [
            self._choice(base + d.index, d.text, d.finish_reason, d.logprobs or [])
            for d in output.deltas
            if d.text or d.finish_reason or d.logprobs
        ]

    def closing(self) -> list[bytes]:
        if not self.include_usage:
            return [DONE]
        return [event(g.usage_chunk(self.head, _total(self.usage))), DONE]
