"""Values that cross the engine boundary: what a request asks for and what each step returns.

The engine speaks token ids and sampling parameters only. These classes are frozen attrs values,
shared by the scheduler (engine/), the worker (runtime/) and the bridge (service.py). Nothing here
knows about HTTP or the OpenAI schema: protocol/ converts to and from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs
import numpy as np
import numpy.typing as npt

FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]

#: How an embedding request pools the final hidden states of its prompt: their mean, the last
#: position's (decoder embedders such as Qwen3-Embedding) or the first's (BERT's CLS).
Pooling = Literal["mean", "last", "cls"]


ConstraintKind = Literal[
    "json_object", "json_schema", "json_schema_string", "tools", "regex", "choice", "grammar"
]


@attrs.frozen
class OutputConstraint:
    """A grammar the output must follow (response_format, tool calling, or vLLM's structured
    outputs: a regex, a choice among strings, a lark grammar), as plain data.

    The runtime compiles it (cached by value) into a token mask applied before sampling. JSON
    payloads are kept as canonical JSON text so the value is hashable and cheap to compare.
    """

    kind: ConstraintKind
    # JSON text: the schema (json_schema), or MLC's schema string; the pattern (regex), the JSON
    # list of strings (choice) or the lark source (grammar)
    schema: str = ""
    strict: bool = False
    tools: str = ""  # JSON text: the OpenAI tools list (kind "tools")
    tool_choice: str = "required"  # "auto", "required" or the name of the one function to call
    parallel: bool = True
    call_format: str = "hermes"  # the model's tool-call text format (see protocol/tool_calls.py)


@attrs.frozen
class SamplingParams:
    """How to sample one request's tokens. Validated by protocol/ before it gets here.

    temperature == 0 means greedy. top_k == -1 or 0 means off. seed None means "engine picks one"
    (the worker draws a random seed so every request still has its own generator stream).
    min_tokens: no stop token or stop string ends a choice before it has that many tokens
    (engine/stop.py). include_stop_str: the matched stop string (or a stop token's text) stays in
    the output.
    """

    n: int = 1
    max_tokens: int | None = None  # None: up to the context window
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = attrs.field(factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    constraint: OutputConstraint | None = None
    #: Logprobs of the prompt's tokens (completions' echo + logprobs, vLLM's prompt_logprobs):
    #: None off; k >= 0 adds the k most likely tokens at each prompt position.
    prompt_logprobs: int | None = None


@attrs.frozen
class GenerationRequest:
    """One request as submitted to the engine: the prompt is already tokenized."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0  # time.monotonic() when the server received it
    #: Not None: an embedding request. The prompt's hidden states are pooled into
    #: `RequestOutput.embedding` and no token is generated (params: n=1, max_tokens=1).
    pooling: Pooling | None = None

    @property
    def needs_every_position(self) -> bool:
        """It needs the model's output at every prompt position, so it cannot start from a
        prefix-cache hit (whose positions are never computed)."""
        return self.pooling is not None or self.params.prompt_logprobs is not None


@attrs.frozen
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@attrs.frozen
class TokenLogprob:
    """Logprob of one sampled token and the top alternatives at its position."""

    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@attrs.frozen
class ChoiceDelta:
    """What one choice (branch) of a request produced in one step.

    `text` never ends inside a UTF-8 character nor inside a possible stop string (held back until
    resolved). `finish_reason` is set exactly once, on the last delta of that choice.
    """

    index: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class RequestOutput:
    """One step's worth of output for one request (all its choices that changed).

    `finished` is True on the request's final record; exactly one final record is delivered per
    request whatever path ends it (done, length, stop, abort, error). `error` carries a message when
    the engine failed the request.
    """

    request_id: str
    deltas: tuple[ChoiceDelta, ...]
    usage: Usage
    finished: bool = False
    error: str | None = None
    num_preemptions: int = 0
    #: On the record where the prompt's computation ends, when params.prompt_logprobs asked:
    #: one entry per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    #: An embedding request's final record: the pooled hidden state (not normalised).
    embedding: npt.NDArray[np.float32] | None = attrs.field(default=None, eq=False)
    #: Speculative decoding, on the final record: (drafts verified, tokens drafted, drafted
    #: tokens accepted) over the request's choices; None when nothing was drafted.
    spec_counts: tuple[int, int, int] | None = None
