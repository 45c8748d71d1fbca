"""When a choice stops, and which text it may emit before it does.

Rules:

* Stop strings are matched on the detokenized text, across token boundaries. `StopMatcher` holds
  back the longest suffix of the text that is a proper prefix of some stop string, so no partial
  stop string is ever emitted: at every moment, everything emitted so far is a prefix of the final
  output. When a stop string matches, the text before it is emitted and the rest is dropped. The
  first stop string to be *completed* wins (the longest among those completed at the same
  character), which is what streaming generation sees, so the result does not depend on how the
  text was split into tokens. With `include` (vLLM's include_stop_str_in_output) the matched
  stop string is emitted too.
* `min_tokens` (vLLM): nothing stops a choice before it has generated min_tokens tokens. The
  caller disarms the matcher (`armed = False`) while the choice has at most min_tokens tokens:
  a stop string completed then does not match and its text is emitted (a proper prefix of a stop
  string at the end is still held back, so a stop string completed once armed still matches);
  and every stop and end-of-generation token is banned (`StopTokens.early_banned_ids`), the way
  ignore_eos bans them. A grammar that allows nothing but EOS still wins over the ban.
* Stop tokens (tokenizer EOS ids, chat-template stop ids, the request's stop_token_ids) end the
  choice with "stop"; their text is never emitted. The stop reason is the token id, except None
  for the tokenizer's own EOS (as vLLM reports it).
* `ignore_eos` ignores every end-of-generation (EOG) token, as llama.cpp does: the EOS ids, the
  template's stop ids and the special tokens llama.cpp marks EOG by name (`EOG_TOKEN_NAMES`) no
  longer stop, and `banned_ids` lists them so the engine sets their logits to -inf (they are
  never sampled). Only the request's own stop_token_ids still stop (and are not banned).
* Reaching max_new_tokens ends the choice with "length", unless the same token also stopped it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from .types import FinishReason


@attrs.define(init=False)
class StopMatcher:
    """Incremental stop-string matcher with hold-back for one choice."""

    _stops: tuple[str, ...]
    _held: str
    _include: bool
    matched: str | None
    armed: bool  # False: a completed stop string does not match (min_tokens not reached)

    def __init__(self, stops: Iterable[str], *, include: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._include = include
        self.matched = None
        self.armed = True

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str) -> str:
        """Feed newly decoded text; return the text that is now safe to emit.

        After a match (`matched` is set) the rest of the text is dropped and push returns "".
        """
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        best: tuple[int, int, str] | None = None  # (end, -length, stop) of the first completed
        for stop in self._stops if self.armed else ():
            at = buf.find(stop)
            if at >= 0 and (best is None or (at + len(stop), -len(stop)) < best[:2]):
                best = (at + len(stop), -len(stop), stop)
        if best is not None:
            self.matched = best[2]
            self._held = ""
            return buf[: best[0] if self._include else best[0] + best[1]]
        hold = self._longest_partial(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of the choice (no stop matched): release what was held back."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best


# llama.cpp (llama_vocab::impl::load in llama-vocab.cpp) marks special tokens with these texts
# as end-of-generation; runtime/gguf_tokenizer.py builds a GGUF file's EOG set from the same list.
EOG_TOKEN_NAMES = frozenset(
    """
    <|eot_id|> <|im_end|> <|end|> <|return|> <|call|> <|flush|> <|calls|> <end_of_turn>
    <|endoftext|> </s> <|eom_id|> <EOT> _<EOT> [EOT] [EOS] <|end_of_text|>
    <end_of_utterance> <eos> <turn|> <|tool_response> <｜end▁of▁sentence｜> [e~[
    """.split()
)


def named_eog_ids(special_tokens: Mapping[int, str]) -> frozenset[int]:
    """The ids among `special_tokens` (id -> text) that llama.cpp treats as end-of-generation."""
    return frozenset(i for i, text in special_tokens.items() if text in EOG_TOKEN_NAMES)


@attrs.frozen
class StopTokens:
    """The stop-token rule for one request."""

    eos_ids: frozenset[int]
    other_ids: frozenset[int]
    banned_ids: frozenset[int] = frozenset()  # ignore_eos: never to be sampled
    eog_ids: frozenset[int] = frozenset()  # every end-of-generation id (see build)

    @property
    def early_banned_ids(self) -> frozenset[int]:
        """What may not be sampled before min_tokens: every stop and end-of-generation id."""
        return self.eos_ids | self.other_ids | self.banned_ids | self.eog_ids

    @classmethod
    def build(
        cls,
        eos_ids: Iterable[int],
        template_ids: Iterable[int],
        request_ids: Iterable[int],
        *,
        ignore_eos: bool,
        eog_ids: Iterable[int] = (),
    ) -> StopTokens:
        """`eog_ids`: further end-of-generation ids, banned with ignore_eos (else ignored)."""
        request = frozenset(request_ids)
        eog = frozenset(eos_ids) | frozenset(template_ids) | frozenset(eog_ids)
        if ignore_eos:
            return cls(frozenset(), request, banned_ids=eog - request, eog_ids=eog)
        other = frozenset(template_ids) | request
        return cls(frozenset(eos_ids) - other, other, eog_ids=eog)

    def check(self, token_id: int) -> tuple[bool, int | None]:
        """(stops?, stop_reason) for a sampled token."""
        if token_id in self.other_ids:
            return True, token_id
        if token_id in self.eos_ids:
            return True, None
        return False, None


def finish_for_token(
    stop_tokens: StopTokens, token_id: int, num_generated: int, max_new_tokens: int
) -> tuple[FinishReason | None, int | None]:
    """Finish reason (and stop reason) once token_id is the num_generated-th generated token."""
    stops, reason = stop_tokens.check(token_id)
    if stops:
        return "stop", reason
    if num_generated >= max_new_tokens:
        return "length", None
    return None, None
