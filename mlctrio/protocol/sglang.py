"""SGLang's request extensions: the fields the SGLang Model Gateway (`sglang-router`) adds.

The gateway parses each request into its own typed struct and re-serialises it, so every request
it forwards carries SGLang's extension fields with their defaults, whatever the client sent
(measured with sglang-router 0.3.2):

    chat:        no_stop_trim, continue_final_message, separate_reasoning, stream_reasoning,
                 return_hidden_states (+ ignore_eos, skip_special_tokens, logprobs: ours already)
    completions: no_stop_trim, return_hidden_states (+ ignore_eos, skip_special_tokens, echo)

Rules: each field is named here with the values mlctrio honours and why; these are dropped before
structuring (as chat.UNSUPPORTED_FIELDS), and any other value, or any field not named anywhere,
is a 400 naming it. Nothing here accepts arbitrary unknown fields.

* `no_stop_trim` (keep the matched stop string in the output): only false. Keeping it would mean
  carrying a flag through the engine's stop matcher; no OpenAI client asks for it, and the
  gateway only ever sends its default false.
* `continue_final_message` (continue the last assistant message instead of opening a new turn):
  only false; the chat templates always open a new assistant turn.
* `return_hidden_states`: only false; mlctrio does not expose hidden states.
* `separate_reasoning`, `stream_reasoning`: any boolean, no effect. They steer SGLang's reasoning
  parser per request; mlctrio's is chosen for the whole server (`--reasoning-parser`,
  server/reasoning.py), which splits and streams reasoning as both defaults (true) ask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final


def _default_false(value: object) -> bool:
    return value is None or value is False


def _boolean(value: object) -> bool:
    return value is None or isinstance(value, bool)


_NO_STOP_TRIM: Final = (
    _default_false,
    "only false is supported (the matched stop string is always trimmed)",
)
_HIDDEN_STATES: Final = (_default_false, "only false is supported (no hidden states are exposed)")
_SERVER_REASONING_PARSER: Final = (
    _boolean,
    "must be a boolean (accepted, no effect: --reasoning-parser decides for the whole server)",
)

#: Chat fields: name -> (accepts the value?, why), merged into chat.UNSUPPORTED_FIELDS.
CHAT_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    "no_stop_trim": _NO_STOP_TRIM,
    "continue_final_message": (
        _default_false,
        "only false is supported (the reply always starts a new assistant turn)",
    ),
    "separate_reasoning": _SERVER_REASONING_PARSER,
    "stream_reasoning": _SERVER_REASONING_PARSER,
    "return_hidden_states": _HIDDEN_STATES,
}

#: Text completion fields, merged into completions.UNSUPPORTED_FIELDS.
COMPLETION_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    "no_stop_trim": _NO_STOP_TRIM,
    "return_hidden_states": _HIDDEN_STATES,
}

#: What /openapi.json says about each field (they are not attrs fields of the request classes).
DESCRIPTIONS: Final[Mapping[str, str]] = {
    "no_stop_trim": "SGLang extension, sent by sglang-router: only false (stop strings trimmed).",
    "continue_final_message": "SGLang extension, sent by sglang-router: only false.",
    "separate_reasoning": "SGLang extension, sent by sglang-router: accepted, no effect "
    "(the server's --reasoning-parser decides).",
    "stream_reasoning": "SGLang extension, sent by sglang-router: accepted, no effect "
    "(the server's --reasoning-parser decides).",
    "return_hidden_states": "SGLang extension, sent by sglang-router: only false.",
}

__all__ = ["CHAT_FIELDS", "COMPLETION_FIELDS", "DESCRIPTIONS"]
