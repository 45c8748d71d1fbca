"""From a validated OpenAI request to engine requests, and from engine outputs to OpenAI JSON.

Hot path: the chunk builders run once per streamed step, so they build plain dicts directly
(tests check them against the protocol's response models and the OpenAPI schemas).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

import attrs

from ..engine.tokens import Tokenizer
from ..engine.types import ChoiceDelta, SamplingParams, TokenLogprob, Usage
from ..errors import ContextLengthExceededError, InvalidRequestError

SYSTEM_FINGERPRINT = "fp_mlctrio"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@attrs.frozen
class ResponseHead:
    """Fields shared by every chunk of one response."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT

    @classmethod
    def new(cls, prefix: str, object_: str, model: str) -> ResponseHead:
        return cls(new_id(prefix), object_, int(time.time()), model)

    def base(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def check_context(
    num_prompt_tokens: int,
    max_tokens: int | None,
    context_window: int,
    *,
    prompt_param: str,
    max_tokens_param: str,
) -> int:
    """Return the max_tokens to use; raise 400 context_length_exceeded like OpenAI/vLLM do."""
    if num_prompt_tokens >= context_window:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_window} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens, leaving no room for a completion.",
            param=prompt_param,
        )
    if max_tokens is None:
        return context_window - num_prompt_tokens
    if num_prompt_tokens + max_tokens > context_window:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_window} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} in the completion). Please reduce the prompt or max_tokens.",
            param=max_tokens_param,
        )
    return max_tokens


def _token_ids(req: Any, vocab: int) -> tuple[dict[int, float], tuple[int, ...]]:
    """logit_bias and stop_token_ids, each id checked against the vocabulary."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        token_id = int(key)
        if not 0 <= token_id < vocab:
            raise InvalidRequestError(
                f"logit_bias: token id {token_id} is outside the vocabulary (0..{vocab - 1}).",
                param="logit_bias",
            )
        bias[token_id] = float(value)
    stop_ids = tuple(req.stop_token_ids or ())
    for token_id in stop_ids:
        if not 0 <= token_id < vocab:
            raise InvalidRequestError(
                f"stop_token_ids: token id {token_id} is outside the vocabulary.",
                param="stop_token_ids",
            )
    return bias, stop_ids


def sampling_params(
    req: Any,
    *,
    max_tokens: int,
    tokenizer: Tokenizer,
    template_stop: Sequence[str] = (),
    template_stop_ids: Sequence[int] = (),
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """Build engine SamplingParams from a parsed chat or completion request."""
    bias, stop_ids = _token_ids(req, tokenizer.vocab_size)
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({min_tokens}) must not exceed the maximum number of tokens to "
            f"generate ({max_tokens}).",
            param="min_tokens",
        )
    if req.ignore_eos:  # the template's stop ids end generation: ignored too (engine/stop.py)
        template_stop_ids = ()
    stop = req.stop
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        n=req.n or 1,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=bias,
        seed=req.seed,
        stop=stops + tuple(s for s in template_stop if s not in stops),
        stop_token_ids=stop_ids + tuple(t for t in template_stop_ids if t not in stop_ids),
        ignore_eos=bool(req.ignore_eos),
        include_stop_str=bool(req.include_stop_str_in_output),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
    )


# ---- chat ------------------------------------------------------------------------------------


def chat_logprobs(items: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.bytes) if lp.bytes is not None else None,
            "top_logprobs": [
                {
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": list(t.bytes) if t.bytes is not None else None,
                }
                for t in lp.top_logprobs
            ],
        }
        for lp in items
    ]


def usage_json(usage: Usage, reasoning_tokens: int | None = None) -> dict[str, Any]:
    """`usage`; `reasoning_tokens` (not None when a reply had a think block: server/reasoning.py)
    adds completion_tokens_details, as OpenAI reports it."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


@attrs.define
class ChoiceAccumulator:
    """Collects one choice's deltas for a non-streaming response."""

    index: int
    text: list[str] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        if delta.text:
            self.text.append(delta.text)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


def chat_completion_json(
    head: ResponseHead,
    choices: Sequence[ChoiceAccumulator],
    usage: Usage,
    want_logprobs: bool,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    body = head.base()
    body["choices"] = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
            "logprobs": (
                {"content": chat_logprobs(c.logprobs or []), "refusal": None}
                if want_logprobs
                else None
            ),
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]
    body["usage"] = usage_json(usage, reasoning_tokens)
    return body


def chat_chunk(
    head: ResponseHead,
    index: int,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    body = head.base()
    body["choices"] = [
        {
            "index": index,
            "delta": delta,
            "logprobs": (
                {"content": chat_logprobs(logprobs), "refusal": None}
                if logprobs is not None
                else None
            ),
            "finish_reason": finish_reason,
        }
    ]
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(
    head: ResponseHead, usage: Usage, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    body = head.base()
    body["choices"] = []
    body["usage"] = usage_json(usage, reasoning_tokens)
    return body


# ---- completions -----------------------------------------------------------------------------


def completion_logprobs(items: Sequence[TokenLogprob | str], text_offset: int) -> dict[str, Any]:
    """Legacy logprobs. An item that is a plain string is a token with no logprob (the first
    token of an echoed prompt): null in token_logprobs and top_logprobs, as OpenAI sends it."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    for lp in items:
        if isinstance(lp, str):
            tokens.append(lp)
            token_logprobs.append(None)
            tops.append(None)
        else:
            tokens.append(lp.token)
            token_logprobs.append(lp.logprob)
            tops.append({t.token: t.logprob for t in lp.top_logprobs})
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def completion_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: Sequence[TokenLogprob | str] | None,
    text_offset: int = 0,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": (completion_logprobs(logprobs, text_offset) if logprobs is not None else None),
        "finish_reason": finish_reason,
    }
