"""Constrained decoding with llguidance: compile a response format or a tool list into a grammar
once, then mask each constrained row's logits so that only tokens the grammar allows are sampled.

    compiler = GrammarCompiler(tokenizer, vocab_size=model_vocab)     # one per model, at start
    grammar = compiler.json_schema(schema, strict=True)               # per request, before prefill
    matcher = grammar.matcher()                                       # per sequence (choice)
    ...each step:  apply_bitmasks(logits, [matcher or None per row]); sample;
                   matcher.accept_token(token)                        # False: grammar violated

Invariants:
- Compiling validates: a schema or tool list llguidance cannot compile raises `GrammarError`
  (an InvalidRequestError with param "response_format", "tools" or "tool_choice"), before any
  generation starts. Compiling may take milliseconds (seconds for huge schemas) and drops the
  GIL in llguidance: call it from a worker thread, not the trio thread.
- A compiled grammar holds a matcher in its initial state that is never advanced; `matcher()`
  deep-copies it (about 1 µs, where building one costs about 1 ms), and the LRU cache keyed by
  the canonical grammar source makes repeated schemas free. Property order is part of the key:
  llguidance emits properties in the schema's order, so two orders are two grammars.
- EOS (the tokenizer's eos ids, plus any stop token ids the caller adds) is allowed exactly when
  the grammar accepts; once the grammar cannot extend, EOS is the only allowed token, so a
  constrained sequence always ends by itself or by max_tokens. max_tokens can cut a JSON document
  short: the engine then reports finish_reason "length" (as OpenAI does) and the text is not
  valid JSON; `GrammarMatcher.is_accepting()` says whether it is complete.
- Masks cover the model's vocabulary (maybe wider than the tokenizer's): padding is never
  allowed. Unconstrained rows (matcher None) are not touched.
- JSON whitespace is bounded (24 characters where JSON allows it): a weak model loops in blanks.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import numpy.typing as npt

from mlctrio.errors import InvalidRequestError
from mlctrio.protocol.tool_calls import ToolCallFormat
from mlctrio.runtime.llg_tokenizer import build_ll_tokenizer

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarError", "GrammarMatcher", "apply_bitmasks"]

DEFAULT_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,24}"
ToolChoiceArg = Literal["auto", "required"] | Mapping[str, Any]

# Per format: the markers around calls ("" for none) and the key holding the arguments.
_FORMATS: Mapping[str, tuple[str, str, str]] = {
    "hermes": ("<tool_call>", "</tool_call>", "arguments"),
    "llama3_json": ("", "", "parameters"),
    "mistral": ("[TOOL_CALLS]", "", "arguments"),
}


class GrammarError(InvalidRequestError):
    """A response format or tool list that cannot be compiled into a grammar (HTTP 400)."""


@attrs.frozen(eq=False)
class CompiledGrammar:
    """A grammar ready to constrain sequences; immutable and shareable between requests."""

    key: str
    source: str  # llguidance's serialized grammar (for logs and debugging)
    _template: llguidance.LLMatcher = attrs.field(repr=False)
    _eos_ids: frozenset[int] = attrs.field(repr=False)
    _num_words: int = attrs.field(repr=False)

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar, for one sequence."""
        return GrammarMatcher(self._template.deep_copy(), self._eos_ids, self._num_words)


@attrs.define(eq=False)
class GrammarMatcher:
    """The grammar state of one sequence. Not thread-safe; owned by the engine worker."""

    _ll: llguidance.LLMatcher
    _eos_ids: frozenset[int]
    num_words: int  # int32 words in one bitmask row: ceil(model vocab / 32)
    _terminated: bool = attrs.field(init=False, default=False)
    # EOS sampled after the grammar had already stopped is not fed to llguidance (it has nothing
    # to consume it with), so a rollback over it must skip one token less.
    _eos_lag: int = attrs.field(init=False, default=0)

    def fill_bitmask(self, row: npt.NDArray[np.int32]) -> None:
        """Write the allowed-token bitmask (bit i of word i // 32 = token i) into `row`.

        A matcher in an error state or stopped allows only EOS.
        """
        assert row.dtype == np.int32 and row.shape == (self.num_words,), row.shape
        assert row.flags["C_CONTIGUOUS"]
        self._ll.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it.

        An EOS token is accepted only where the grammar accepts, and terminates the matcher. A
        rejected token leaves the matcher in an error state (it then allows only EOS).
        """
        if self._terminated:
            return False
        if token_id in self._eos_ids:
            if not self._ll.is_accepting():
                return False
            if self._ll.is_stopped():
                self._eos_lag = 1
            elif not self._ll.consume_token(token_id):
                return False
            self._terminated = True
            return True
        return bool(self._ll.consume_token(token_id))

    def is_accepting(self) -> bool:
        """True if the text so far is a complete sentence of the grammar (EOS allowed now)."""
        return self._terminated or bool(self._ll.is_accepting())

    def is_terminated(self) -> bool:
        """True once EOS was accepted, or the matcher is in an error state."""
        return self._terminated or bool(self._ll.is_error())

    def is_stopped(self) -> bool:
        """True if no more text can follow: only EOS is allowed next."""
        return bool(self._ll.is_stopped())

    @property
    def error(self) -> str | None:
        """llguidance's message once the matcher is in an error state, else None."""
        return self._ll.get_error() or None

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, stop strings)."""
        if num_tokens <= 0:
            return True
        if self._terminated:
            num_tokens -= self._eos_lag
            self._terminated, self._eos_lag = False, 0
        return num_tokens == 0 or bool(self._ll.rollback(num_tokens))


def apply_bitmasks(
    logits: npt.NDArray[np.float32],
    matchers: Sequence[GrammarMatcher | None],
    *,
    executor: llguidance.LLExecutor | None = None,
) -> None:
    """Set to -inf, in place, the logits of tokens that row i's matcher forbids.

    Rows whose matcher is None are left alone and cost nothing. Columns beyond the matchers'
    vocabulary (padding) are masked in constrained rows. With an `executor`, the masks of several
    rows are computed in parallel (llguidance releases the GIL).
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    constrained = [m for m in matchers if m is not None]
    bitmask = np.empty((len(rows), constrained[0].num_words), dtype=np.int32)
    if executor is not None and len(rows) > 1:
        pairs = [(m._ll, j) for j, m in enumerate(constrained)]
        llg_numpy.fill_next_token_bitmask_par(executor, pairs, bitmask)
    else:
        for j, m in enumerate(constrained):
            m.fill_bitmask(bitmask[j])
    width = min(logits.shape[1], bitmask.shape[1] * 32)
    # Little-endian words, so byte-wise little-endian unpacking puts token t at bit t.
    allowed = np.unpackbits(
        bitmask.astype("<i4", copy=False).view(np.uint8), axis=1, bitorder="little"
    )[:, :width].view(np.bool_)
    full = len(rows) == logits.shape[0]
    index = slice(None) if full else np.asarray(rows)
    block = logits[index, :width]  # a view for a fully constrained batch, else a copy
    np.copyto(block, -np.inf, where=~allowed)
    if not full:
        logits[index, :width] = block
    logits[index, width:] = -np.inf


def _canonical(value: Any) -> str:
    # No sort_keys: property order changes the grammar (see the module docstring).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@attrs.define(eq=False)
class GrammarCompiler:
    """Compiles response formats and tool lists for one tokenizer; one per served model.

    `tokenizer` is an HFTokenizer (or anything with its `backend`/`token_bytes` surface).
    `vocab_size` is the width of the model's logits (>= the tokenizer's). `stop_token_ids` are
    extra ids that end generation (chat-template stop tokens) and count as EOS. Thread-safe.
    """

    tokenizer: Any
    vocab_size: int | None = None
    stop_token_ids: Sequence[int] = ()
    cache_size: int = 256
    whitespace_pattern: str = DEFAULT_WHITESPACE
    _ll_tokenizer: llguidance.LLTokenizer = attrs.field(init=False, repr=False)
    _eos_ids: frozenset[int] = attrs.field(init=False)
    _num_words: int = attrs.field(init=False)
    _cache: collections.OrderedDict[str, CompiledGrammar] = attrs.field(
        init=False, factory=collections.OrderedDict, repr=False
    )
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False)

    def __attrs_post_init__(self) -> None:
        n_vocab = max(self.vocab_size or 0, int(self.tokenizer.vocab_size))
        eos = list(dict.fromkeys([*self.tokenizer.eos_token_ids, *self.stop_token_ids]))
        if not eos:
            raise ValueError("constrained decoding needs at least one EOS / stop token id")
        self._eos_ids = frozenset(eos)
        self._ll_tokenizer = build_ll_tokenizer(self.tokenizer, n_vocab, eos)
        # llguidance decides the mask width (the bytes-only path ignores n_vocab); logits
        # beyond it are masked as padding.
        self._num_words = -(-int(self._ll_tokenizer.vocab_size) // 32)

    def json_object(self) -> CompiledGrammar:
        """Any JSON object (response_format json_object)."""
        return self.json_schema({"type": "object"}, strict=False)

    def json_schema(self, schema: Mapping[str, Any], *, strict: bool = False) -> CompiledGrammar:
        """A JSON document valid under `schema`.

        strict: unsupported keywords and formats are errors. Otherwise they are ignored
        (llguidance's `lenient`), as OpenAI's non-strict mode only asks for best effort.
        """
        if not isinstance(schema, Mapping):
            raise GrammarError("the JSON schema must be an object", param="response_format")
        body = self._schema_with_options(schema, lenient=not strict)
        source = llguidance.LLMatcher.grammar_from_json_schema(_canonical(body))
        return self._compile(f"json:{_canonical(body)}", source, "response_format")

    def json_schema_string(self, schema: str) -> CompiledGrammar:
        """MLC's `response_format: {"type": "json_object", "schema": "<JSON Schema text>"}`."""
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"schema is not valid JSON: {exc}", param="response_format") from exc
        return self.json_schema(parsed)

    def regex(self, pattern: str, param: str = "structured_outputs") -> CompiledGrammar:
        """Text matching the regular expression (vLLM's guided_regex)."""
        source = llguidance.LLMatcher.grammar_from_regex(pattern)
        return self._compile(f"regex:{pattern}", source, param)

    def choice(self, options: Sequence[str], param: str = "structured_outputs") -> CompiledGrammar:
        """Exactly one of the strings (vLLM's guided_choice)."""
        # A JSON string literal is a valid lark string literal.
        lark = "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options) + "\n"
        return self._compile(f"choice:{_canonical(list(options))}", lark, param)

    def lark(self, grammar: str, param: str = "structured_outputs") -> CompiledGrammar:
        """Text of a grammar in llguidance's lark dialect (vLLM's guided_grammar)."""
        return self._compile(
            f"lark:{grammar}", llguidance.LLMatcher.grammar_from_lark(grammar), param
        )

    def tools(
        self,
        tools: Sequence[Mapping[str, Any]],
        tool_choice: ToolChoiceArg,
        *,
        parallel: bool = True,
        call_format: ToolCallFormat = "hermes",
    ) -> CompiledGrammar:
        """Tool calls in the model's text format, with arguments valid for each tool's schema.

        `tools` are OpenAI tool dicts ({"type": "function", "function": {...}}). `tool_choice`:
        "required" (one or more calls, nothing else), {"name": ...} or OpenAI's
        {"type": "function", "function": {"name": ...}} (exactly one call of that tool), or
        "auto": free text, and a call is constrained only once the model starts one (a lazy
        grammar triggered by the format's start marker, or a leading `{` for llama3_json).
        """
        functions = [_function(t) for t in tools]
        if not functions:
            raise GrammarError("tools must not be empty", param="tools")
        if tool_choice in ("auto", "required"):
            mode = str(tool_choice)
        elif isinstance(tool_choice, Mapping):
            name = tool_choice.get("name") or (tool_choice.get("function") or {}).get("name")
            functions = [f for f in functions if f.get("name") == name]
            if not functions:
                raise GrammarError(f"unknown tool {name!r}", param="tool_choice")
            mode, parallel = "required", False
        else:
            raise GrammarError(f"unsupported tool_choice {tool_choice!r}", param="tool_choice")
        if call_format not in _FORMATS:
            raise ValueError(f"unknown tool call format {call_format!r}")
        lenient = not any(f.get("strict") for f in functions)
        lark = self._tools_lark(functions, mode, parallel, call_format, lenient)
        key = f"tools:{call_format}:{mode}:{parallel}:{_canonical(functions)}"
        return self._compile(key, llguidance.LLMatcher.grammar_from_lark(lark), "tools")

    def _schema_with_options(self, schema: Mapping[str, Any], *, lenient: bool) -> dict[str, Any]:
        options = {"whitespace_pattern": self.whitespace_pattern, "lenient": lenient}
        given = schema.get("x-guidance")
        return {**schema, "x-guidance": {**(given if isinstance(given, dict) else {}), **options}}

    def _marker(self, text: str) -> str:
        """A lark expression for a marker: a special token by id if the tokenizer has one
        (its text never appears in decoded bytes), else the literal string."""
        token_id = self.tokenizer.token_to_id(text)
        if token_id is not None and token_id in self.tokenizer.special_token_ids:
            return f"<[{token_id}]>"
        return json.dumps(text)  # a JSON string literal is a valid lark string literal

    def _tools_lark(
        self, functions: list[dict[str, Any]], mode: str, parallel: bool, call_format: str,
        lenient: bool,
    ) -> str:  # fmt: skip
        start, end, arg_key = _FORMATS[call_format]
        # Omitted parameters mean a function without parameters (OpenAI): arguments are {}.
        no_parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        variants = [
            {"type": "object", "required": ["name", arg_key], "additionalProperties": False,
             "properties": {"name": {"const": f["name"]},
                            arg_key: f.get("parameters") or no_parameters}}
            for f in functions
        ]  # fmt: skip
        one: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
        lines = ["%llguidance {}"]
        if call_format == "mistral":
            array = {"type": "array", "items": one, "minItems": 1}
            array |= {} if parallel else {"maxItems": 1}
            body = _canonical(self._schema_with_options(array, lenient=lenient))
            lines.append(f"array: %json {body}")
            lines.append(f"calls: {self._marker(start)} array")
        else:
            body = _canonical(self._schema_with_options(one, lenient=lenient))
            lines.append(f"body: %json {body}")
            if call_format == "hermes":
                lines.append(f'call: {self._marker(start)} "\\n" body "\\n" {self._marker(end)}')
                lines.append('calls: call ("\\n" call)*' if parallel else "calls: call")
            else:  # llama3_json: bare JSON objects, several joined by "; "
                lines.append('calls: body ("; " body)*' if parallel else "calls: body")
        if mode == "required":
            lines.append("start: calls")
        elif call_format == "llama3_json":
            # Free text may not open with "{": a leading "{" is the start of a call.
            lines += ["start: TEXT | LEAD calls", r"LEAD: /[ \t\n]{0,4}/"]
            lines.append(r"TEXT: /[ \t\n]*([^{ \t\n](.|\n)*)?/")
        else:
            marker = self._marker(start)
            lines += ["tail: TEXT", r"TEXT: /(.|\n)*/"]
            if marker.startswith("<["):  # a special token cannot occur inside TEXT
                head = f"TEXT {marker}"
            else:  # lazy: the head lexeme ends at the first occurrence of the marker
                lines.append(f"call_head[lazy]: TEXT {marker}")
                head = "call_head"
            if call_format == "hermes":
                lines.append(f'call_auto: {head} "\\n" body "\\n" {self._marker(end)}')
                lines.append("start: call_auto* tail" if parallel else "start: tail | call_auto")
            else:
                lines.append(f"start: tail | {head} array")
        return "\n".join(lines) + "\n"

    def _compile(self, key: str, source: str, param: str) -> CompiledGrammar:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        # Outside the lock: building can take a while, and llguidance releases the GIL.
        template = llguidance.LLMatcher(self._ll_tokenizer, source, log_level=0)
        if template.is_error():
            raise GrammarError(f"cannot compile the {param}: {template.get_error()}", param=param)
        grammar = CompiledGrammar(key, source, template, self._eos_ids, self._num_words)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def cache_len(self) -> int:
        """How many compiled grammars the cache holds."""
        with self._lock:
            return len(self._cache)


def _function(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise GrammarError("each tool must be a function with a name", param="tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise GrammarError("a function's parameters must be a JSON schema object", param="tools")
    strict = bool(function.get("strict"))
    return {"name": function["name"], "parameters": parameters, "strict": strict}
