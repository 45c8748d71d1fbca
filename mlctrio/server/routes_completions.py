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

from ..engine.types import GenerationRequest, RequestOutput, Usage
from ..errors import InvalidRequestError
from ..protocol.openai import parse_completion_request
from . import generation as g
from . import prompts, tools
from .sse import DONE, event
from .state import current_state, json_response, read_json
from .streaming import EndsWithDone, collect, deadline_for, in_thread, streamed_response


async def completions() -> Response:
    arrival = time.monotonic()
    state = current_state()
    req = parse_completion_request(await read_json())
    state.check_model(req.model)
    info = state.model_info()
    if req.echo and req.logprobs is not None:
        raise InvalidRequestError(
            "echo together with logprobs needs prompt logprobs, which this server does not "
            "compute (the model runner returns the last position's logits only).",
            param="echo",
        )
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
        if guided is not None:
            params = attrs.evolve(params, constraint=guided[0])
        request_id = head.id if len(prompt_ids) == 1 else f"{head.id}-{k}"
        gens.append(GenerationRequest(request_id, tuple(prompt), params, arrival))
    n = gens[0].params.n
    index_of = {gen.request_id: k * n for k, gen in enumerate(gens)}
    echo = (
        [info.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
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
    echo: list[str] | None,
    want_logprobs: bool,
) -> dict[str, Any]:
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
                c.logprobs if want_logprobs else None,
                len(prefix),
            )
        )
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
    echo: list[str] | None
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
        if self.echo is None:
            return []
        n = self.gens[0].params.n
        lps: list[Any] | None = [] if self.want_logprobs else None
        return [
            self._choice(k * n + i, text, None, lps)
            for k, text in enumerate(self.echo)
            for i in range(n)
        ]

    def output_events(self, output: RequestOutput) -> list[bytes]:
        self.usage[output.request_id] = output.usage
        base = self.index_of[output.request_id]
        return [
            self._choice(base + d.index, d.text, d.finish_reason, d.logprobs or [])
            for d in output.deltas
            if d.text or d.finish_reason or d.logprobs
        ]

    def closing(self) -> list[bytes]:
        if not self.include_usage:
            return [DONE]
        return [event(g.usage_chunk(self.head, _total(self.usage))), DONE]
