"""Grammar-constrained sampling with the tiny demo model's tokenizer and random logits.

Random logits are the adversary: whatever the model "wants", every finished output must parse and
validate. To make random walks finish, the logits get a bias towards EOS (taken as soon as the
grammar allows it) and towards tokens that close strings, objects and arrays; the schemas bound
lengths where the grammar would otherwise allow unbounded text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from mlctrio.engine.types import SamplingParams
from mlctrio.errors import InvalidRequestError
from mlctrio.models.demo import ensure_demo_model
from mlctrio.protocol.tool_calls import parse_tool_calls
from mlctrio.runtime.grammar import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    apply_bitmasks,
)
from mlctrio.runtime.sampler import Sampler, make_generator
from mlctrio.runtime.tokenizer import HFTokenizer, load_tokenizer

MODEL_VOCAB = 1024  # the tiny tokenizer has 1000 tokens: 24 ids of padding, like real models
MAX_TOKENS = 400

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 10**6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "email": {"type": "string", "maxLength": 10},
                "verified": {"type": "boolean"},
                "score": {"type": ["number", "null"]},
            },
            "required": ["verified"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "kind", "owner"],
    "additionalProperties": False,
}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer"},
                    "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    cache = tmp_path_factory.mktemp("demo-cache")
    return load_tokenizer(ensure_demo_model("tiny", cache_dir=cache))


@pytest.fixture(scope="module")
def compiler(tokenizer: HFTokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=MODEL_VOCAB)


@pytest.fixture(scope="module")
def bias(tokenizer: HFTokenizer) -> np.ndarray:
    """EOS first whenever allowed; closers often; whitespace rarely."""
    out = np.zeros(MODEL_VOCAB, dtype=np.float32)
    for token_id in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(token_id)
        if raw[-1:] in (b'"', b"}", b"]"):
            out[token_id] += 3.0
        if raw.strip() == b"":
            out[token_id] -= 3.0
    out[list(tokenizer.eos_token_ids)] = 30.0
    return out


def generate(
    tokenizer: HFTokenizer,
    matchers: Sequence[GrammarMatcher],
    bias: np.ndarray,
    seed: int,
    max_tokens: int = MAX_TOKENS,
) -> list[tuple[str, str]]:
    """A batch of constrained sequences under random logits: (text, finish_reason) per row."""
    num_rows = len(matchers)
    rng = np.random.default_rng(seed)
    sampler = Sampler(tokenizer.vocab_size)
    params = [SamplingParams(temperature=1.0)] * num_rows
    generators = [make_generator(seed, i) for i in range(num_rows)]
    outputs: list[list[int]] = [[] for _ in range(num_rows)]
    finish: list[str | None] = [None] * num_rows
    eos = set(tokenizer.eos_token_ids)
    for _ in range(max_tokens):
        live = [i for i in range(num_rows) if finish[i] is None]
        if not live:
            break
        logits = rng.standard_normal((len(live), MODEL_VOCAB), dtype=np.float32) * 2 + bias
        apply_bitmasks(logits, [matchers[i] for i in live])
        assert np.isneginf(logits[:, tokenizer.vocab_size :]).all()  # padding is never allowed
        sampled = sampler.sample(
            logits, params[: len(live)], [generators[i] for i in live], [()] * len(live),
            [()] * len(live),
        ).token_ids  # fmt: skip
        for row, token_id in zip(live, sampled.tolist(), strict=True):
            assert matchers[row].accept_token(token_id), matchers[row].error
            if token_id in eos:
                assert matchers[row].is_terminated()
                finish[row] = "stop"
            else:
                outputs[row].append(token_id)
    return [
        (tokenizer.decode(ids, skip_special_tokens=False), reason or "length")
        for ids, reason in zip(outputs, finish, strict=True)
    ]


def run_many(
    tokenizer: HFTokenizer, grammar: CompiledGrammar, bias: np.ndarray, n: int = 100
) -> list[str]:
    """n seeded generations in batches of 10; all of them must finish by themselves."""
    texts: list[str] = []
    for seed in range(0, n, 10):
        results = generate(tokenizer, [grammar.matcher() for _ in range(10)], bias, seed)
        assert [reason for _, reason in results] == ["stop"] * 10, results
        texts += [text for text, _ in results]
    return texts


def test_json_object_outputs_parse(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, bias: np.ndarray
) -> None:
    texts = run_many(tokenizer, compiler.json_object(), bias)
    for text in texts:
        assert isinstance(json.loads(text), dict), text
    assert len(set(texts)) > 50  # random logits explore, they do not repeat one answer


def test_nested_schema_outputs_validate(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, bias: np.ndarray
) -> None:
    texts = run_many(tokenizer, compiler.json_schema(NESTED_SCHEMA, strict=True), bias)
    values = [json.loads(text) for text in texts]
    for value in values:
        jsonschema.validate(value, NESTED_SCHEMA)
    assert {v["kind"] for v in values} == {"cat", "dog", "bird"}
    assert any("tags" in v for v in values) and any("tags" not in v for v in values)


def test_required_tools_hermes_outputs_parse_and_validate(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, bias: np.ndarray
) -> None:
    grammar = compiler.tools(TOOLS, "required", parallel=True, call_format="hermes")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names_seen: set[str] = set()
    for text in run_many(tokenizer, grammar, bias):
        parsed = parse_tool_calls(text, "hermes")
        assert parsed.content is None, text
        assert parsed.tool_calls, text
        assert parsed.finish_reason("stop") == "tool_calls"
        for call in parsed.tool_calls:
            names_seen.add(call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            assert call.id.startswith("call_") and len(call.id) == 29
    assert names_seen == set(schemas)


@pytest.mark.parametrize("call_format", ["hermes", "llama3_json", "mistral"])
def test_parallel_calls_only_when_asked(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, call_format: Any
) -> None:
    key = "parameters" if call_format == "llama3_json" else "arguments"
    one = f'{{"name": "add", "{key}": {{"a": 1, "b": [2]}}}}'
    two = f'{{"name": "get_weather", "{key}": {{"city": "Oslo"}}}}'
    first, rest = {
        "hermes": (f"<tool_call>\n{one}\n</tool_call>", f"\n<tool_call>\n{two}\n</tool_call>"),
        "llama3_json": (one, f"; {two}"),
        "mistral": (f"[TOOL_CALLS][{one}", f", {two}]"),
    }[call_format]
    parallel = compiler.tools(TOOLS, "required", parallel=True, call_format=call_format)
    matcher = parallel.matcher()
    assert feed(matcher, tokenizer, first + rest) and matcher.is_accepting()
    parsed = parse_tool_calls(first + rest, call_format)
    assert [c.function.name for c in parsed.tool_calls] == ["add", "get_weather"]
    single = compiler.tools(TOOLS, "required", parallel=False, call_format=call_format)
    matcher = single.matcher()
    assert not feed(matcher, tokenizer, first + rest)


@pytest.mark.parametrize("call_format", ["hermes", "llama3_json", "mistral"])
def test_named_tool_choice_forces_one_call(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, bias: np.ndarray, call_format: Any
) -> None:
    grammar = compiler.tools(TOOLS, {"name": "add"}, call_format=call_format)
    for seed in range(3):
        results = generate(tokenizer, [grammar.matcher() for _ in range(8)], bias, seed)
        for text, reason in results:
            assert reason == "stop"
            parsed = parse_tool_calls(text, call_format)
            assert [c.function.name for c in parsed.tool_calls] == ["add"], text
            jsonschema.validate(
                json.loads(parsed.tool_calls[0].function.arguments),
                TOOLS[1]["function"]["parameters"],
            )


def feed(matcher: GrammarMatcher, tokenizer: HFTokenizer, text: str) -> bool:
    return all(matcher.accept_token(t) for t in tokenizer.encode(text))


@pytest.mark.parametrize("call_format", ["hermes", "mistral"])
def test_auto_tool_choice_is_lazy(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, call_format: Any
) -> None:
    grammar = compiler.tools(TOOLS, "auto", call_format=call_format)
    start = "<tool_call>\n" if call_format == "hermes" else "[TOOL_CALLS]["
    free = grammar.matcher()
    assert feed(free, tokenizer, "Any text {at all}, even <tool and [TOOL")
    assert free.is_accepting()
    good = grammar.matcher()
    assert feed(good, tokenizer, "Let me check. " + start + '{"name": "get_weather", "arguments": ')
    assert not good.is_accepting()
    bad = grammar.matcher()
    assert not feed(bad, tokenizer, "Let me check. " + start + '{"name": "nope"')
    assert bad.is_terminated() and bad.error  # an error state: only EOS is allowed now


def test_special_token_markers(tokenizer: HFTokenizer, tmp_path: Path) -> None:
    """A marker that is a special token is matched by id, never by its text."""
    import tokenizers

    raw = tokenizers.Tokenizer.from_str(tokenizer.backend.tok.to_str())  # type: ignore[attr-defined]
    raw.add_special_tokens(["[TOOL_CALLS]"])
    raw.save(str(tmp_path / "tokenizer.json"))
    special = HFTokenizer.from_file(tmp_path / "tokenizer.json", eos_token_ids=(2,))
    marker = special.token_to_id("[TOOL_CALLS]")
    assert marker == tokenizer.vocab_size
    compiler = GrammarCompiler(special, vocab_size=MODEL_VOCAB)
    call = special.encode('[{"name": "add", "arguments": {"a": 1, "b": []}}]')
    for choice in ("auto", "required"):
        grammar = compiler.tools(TOOLS, choice, call_format="mistral")
        prefix = special.encode("Hi ") if choice == "auto" else []
        by_id = grammar.matcher()
        assert all(by_id.accept_token(t) for t in [*prefix, marker, *call])
        assert by_id.is_accepting()
        assert not grammar.matcher().accept_token(special.encode("[")[0]) or choice == "auto"
        # The marker spelled out in text tokens is only text: auto takes it (and the JSON after
        # it) as free text; required does not take it at all.
        spelled = [special.token_to_id(c) for c in "[TOOL_CALLS]"]
        assert None not in spelled
        by_text = grammar.matcher()
        ok = all(by_text.accept_token(t) for t in [*prefix, *spelled, *call])  # type: ignore[arg-type]
        assert ok == (choice == "auto")


def test_llama3_auto_allows_text_or_calls(
    tokenizer: HFTokenizer, compiler: GrammarCompiler
) -> None:
    grammar = compiler.tools(TOOLS, "auto", call_format="llama3_json")
    assert feed(grammar.matcher(), tokenizer, "It is sunny.")
    call = '{"name": "add", "parameters": {"a": 1, "b": []}}'
    matcher = grammar.matcher()
    assert feed(matcher, tokenizer, call) and matcher.is_accepting()
    assert not feed(grammar.matcher(), tokenizer, '{"name": "add", "parameters": {"a": "x"')


def test_eos_only_when_accepting_and_rollback(
    tokenizer: HFTokenizer, compiler: GrammarCompiler
) -> None:
    eos = tokenizer.eos_token_ids[0]
    matcher = compiler.json_object().matcher()
    row = np.zeros(matcher.num_words, dtype=np.int32)
    assert feed(matcher, tokenizer, '{"a": 1')
    matcher.fill_bitmask(row)
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
    assert eos not in allowed and allowed.size > 1
    assert not matcher.accept_token(eos) and not matcher.is_terminated()
    assert feed(matcher, tokenizer, "}")
    matcher.fill_bitmask(row)  # a closed top-level object cannot continue: EOS only
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
    assert set(allowed.tolist()) == set(tokenizer.eos_token_ids)
    assert matcher.accept_token(eos) and matcher.is_terminated()
    assert matcher.rollback(2) and not matcher.is_terminated() and not matcher.is_accepting()
    assert feed(matcher, tokenizer, "}") and matcher.is_accepting()


def test_max_tokens_cuts_json_short(
    tokenizer: HFTokenizer, compiler: GrammarCompiler, bias: np.ndarray
) -> None:
    matchers = [compiler.json_schema(NESTED_SCHEMA).matcher() for _ in range(4)]
    for (text, reason), matcher in zip(
        generate(tokenizer, matchers, bias, seed=7, max_tokens=5), matchers, strict=True
    ):
        assert reason == "length" and not matcher.is_accepting()
        with pytest.raises(ValueError):
            json.loads(text)


def test_unconstrained_rows_untouched(compiler: GrammarCompiler) -> None:
    logits = np.random.default_rng(0).standard_normal((3, MODEL_VOCAB), dtype=np.float32)
    before = logits.copy()
    apply_bitmasks(logits, [None, compiler.json_object().matcher(), None])
    np.testing.assert_array_equal(logits[[0, 2]], before[[0, 2]])
    allowed = np.isfinite(logits[1])
    assert 0 < allowed.sum() < 20  # "{" and tokens that start with it (no leading whitespace)
    apply_bitmasks(logits, [None, None, None])
    np.testing.assert_array_equal(logits[[0, 2]], before[[0, 2]])


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda c: c.json_schema({"type": "objectx"}), "response_format"),
        (lambda c: c.json_schema({"type": "string", "pattern": "(?<=a)b"}), "response_format"),
        (lambda c: c.json_schema({"$ref": "#/$defs/missing"}), "response_format"),
        (lambda c: c.json_schema({"format": "no-such-format"}, strict=True), "response_format"),
        (lambda c: c.json_schema_string("{not json"), "response_format"),
        (
            lambda c: c.tools(
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
                "required",
            ),
            "tools",
        ),
        (lambda c: c.tools([], "required"), "tools"),
        (lambda c: c.tools(TOOLS, {"name": "nope"}), "tool_choice"),
    ],
)
def test_bad_schemas_raise_at_compile_time(
    compiler: GrammarCompiler, make: Any, param: str
) -> None:
    with pytest.raises(GrammarError) as info:
        make(compiler)
    assert isinstance(info.value, InvalidRequestError)
    assert info.value.param == param and info.value.status == 400


def test_cache_reuses_and_bounds(tokenizer: HFTokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, cache_size=2)
    first = compiler.json_schema({"type": "object", "properties": {"a": {}, "b": {}}})
    assert compiler.json_schema({"type": "object", "properties": {"a": {}, "b": {}}}) is first
    swapped = compiler.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert swapped is not first  # property order is part of the grammar
    compiler.json_object()
    assert compiler.cache_len() == 2
    assert compiler.json_schema({"type": "object", "properties": {"a": {}, "b": {}}}) is not first


def test_sentencepiece_style_backend_path(tokenizer: HFTokenizer, bias: np.ndarray) -> None:
    """Without a tokenizer.json, llguidance gets each token's bytes instead; same masks."""

    class BytesOnly:
        backend = None  # no tokenizer.json behind it

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

    via_json = GrammarCompiler(tokenizer, vocab_size=MODEL_VOCAB).json_schema(NESTED_SCHEMA)
    via_bytes = GrammarCompiler(BytesOnly(), vocab_size=MODEL_VOCAB).json_schema(NESTED_SCHEMA)
    a, b = via_json.matcher(), via_bytes.matcher()
    text = '{"id": 12, "kind": "dog", "owner": {"verified": true}}'
    for token_id in tokenizer.encode(text):
        rows = np.zeros((2, a.num_words), dtype=np.int32)
        a.fill_bitmask(rows[0])
        b.fill_bitmask(rows[1])
        np.testing.assert_array_equal(rows[0], rows[1])
        assert a.accept_token(token_id) and b.accept_token(token_id)
    assert a.is_accepting() and b.is_accepting()
