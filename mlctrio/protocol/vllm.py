"""vLLM's request extensions: the extra fields real clients send through the SDK's `extra_body`.

Rules:

* Fields mlctrio honours are attrs fields of the request classes (SamplingRequest and the chat /
  completion requests): top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
  skip_special_tokens, min_tokens, include_stop_str_in_output, the structured-output fields
  below, chat_template_kwargs and add_generation_prompt (chat), add_special_tokens (completions).
* Structured outputs: `structured_outputs` (vLLM >= 0.10: exactly one of json, regex, choice,
  grammar, json_object) or the older `guided_json` / `guided_regex` / `guided_choice` /
  `guided_grammar`. At most one constraint per request; `guided_decoding_backend` is accepted and
  ignored (llguidance is the only backend). A `grammar` is llguidance's lark dialect.
* Fields that only steer what mlctrio does not have are accepted with their default values (and
  dropped before structuring, as chat.UNSUPPORTED_FIELDS); any other value is a 400 naming the
  field and saying why. Nothing here accepts arbitrary unknown fields.
* vLLM's own `prompt_logprobs` field stays a 400 (its response shape, with ranks and token-id
  keys, is not built): prompt logprobs come the OpenAI way, with completions' echo + logprobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from mlctrio.protocol.validate import FieldError, constraints

#: The keys of `structured_outputs` that name a constraint (exactly one must be set).
CONSTRAINT_KEYS: Final = ("json", "regex", "choice", "grammar", "json_object")


@attrs.frozen(kw_only=True)
class StructuredOutputs:
    """vLLM's `structured_outputs` object (its StructuredOutputsParams)."""

    json: Mapping[str, object] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = attrs.field(
        default=None, metadata=constraints(minItems=1, items={"minLength": 1})
    )
    grammar: str | None = attrs.field(default=None, metadata=constraints(minLength=1))
    json_object: bool | None = None
    #: vLLM's "no fallback to another backend on failure": there is only one backend.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None

    def _check(self) -> None:
        given = [k for k in CONSTRAINT_KEYS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise FieldError(
                f"exactly one of {', '.join(CONSTRAINT_KEYS)} must be given (got {len(given)})"
            )
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if getattr(self, name):
                raise FieldError(f"{name} is not supported", (name,))
        if self.whitespace_pattern is not None:
            raise FieldError("whitespace_pattern is not supported", ("whitespace_pattern",))


def _none(value: object) -> bool:
    return value is None


def _none_or_empty(value: object) -> bool:
    return value is None or value == [] or value == {}


def _default_false(value: object) -> bool:
    return value is None or value is False


def _default_true(value: object) -> bool:
    return value is None or value is True


def _number(target: float) -> Any:
    return lambda v: v is None or (type(v) in (int, float) and v == target)


def _string(value: object) -> bool:
    return value is None or isinstance(value, str)


_NO_PROMPT_LOGPROBS: Final = (
    _none,
    "vLLM's prompt_logprobs field is not supported; on /v1/completions, echo with logprobs "
    "returns the prompt's logprobs",
)

#: Fields of both APIs: name -> (accepts the value?, why), merged into *.UNSUPPORTED_FIELDS.
COMMON_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    "use_beam_search": (_default_false, "beam search is not supported"),
    "length_penalty": (_number(1), "length_penalty applies to beam search only"),
    "spaces_between_special_tokens": (
        _default_true,
        "only true is supported (special tokens are decoded as the tokenizer joins them)",
    ),
    "truncate_prompt_tokens": (_none, "prompt truncation is not supported"),
    "prompt_logprobs": _NO_PROMPT_LOGPROBS,
    "allowed_token_ids": (_none, "allowed_token_ids is not supported: use logit_bias"),
    "bad_words": (_none_or_empty, "bad_words is not supported: use logit_bias"),
    "logits_processors": (_none_or_empty, "custom logits processors are not supported"),
    "return_tokens_as_token_ids": (_default_false, "only false is supported"),
    "return_token_ids": (_default_false, "only false is supported"),
    "cache_salt": (_none, "per-tenant prefix cache isolation is not supported"),
    "priority": (_number(0), "priority scheduling is not supported"),
    "request_id": (_string, "must be a string (accepted and not used: ids are the server's)"),
    "kv_transfer_params": (_none_or_empty, "disaggregated serving is not supported"),
    "vllm_xargs": (_none_or_empty, "no custom extensions read vllm_xargs"),
    "guided_whitespace_pattern": (_none, "a custom whitespace pattern is not supported"),
    "structural_tag": (_none, "structural tags are not supported"),
}

#: Chat-only fields, merged into chat.UNSUPPORTED_FIELDS.
CHAT_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    **COMMON_FIELDS,
    "echo": (_default_false, "echoing the last message is not supported"),
    "add_special_tokens": (
        _default_false,
        "only false is supported (the chat template writes the special tokens)",
    ),
    "documents": (_none_or_empty, "documents (RAG templates) are not supported"),
    "chat_template": (_none, "only the model's own chat template is used"),
    "mm_processor_kwargs": (_none_or_empty, "multimodal input is not supported"),
    "best_of": (_number(1), "best_of is not supported for chat"),
    "include_reasoning": (
        _default_true,
        "only true is supported (reasoning_content comes whenever --reasoning-parser splits it)",
    ),
}

#: Text completion fields, merged into completions.UNSUPPORTED_FIELDS.
COMPLETION_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    **COMMON_FIELDS,
    "prompt_embeds": (_none, "prompt embeddings are not supported"),
}

__all__ = [
    "CHAT_FIELDS",
    "COMMON_FIELDS",
    "COMPLETION_FIELDS",
    "CONSTRAINT_KEYS",
    "StructuredOutputs",
]
