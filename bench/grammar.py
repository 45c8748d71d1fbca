"""Per-step cost of grammar masks: fill the bitmask and apply it to the logits (µs per step).

    python bench/grammar.py [--steps 300] [--cache-dir DIR]

Tokenizers: the demo `small` tokenizer (byte-level BPE, 8000 tokens, trained here, no weights)
and a random 32000-token vocabulary (bytes only, the path SentencePiece models take). Each step
masks random logits, samples under the mask and advances the matchers (the advance is timed
apart, as "accept"); a finished sequence restarts with a fresh matcher. Batch rows are all
constrained; "none" is the same batch with no matchers (what unconstrained requests pay).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import llguidance
import numpy as np

from mlctrio.models.demo import train_demo_tokenizer
from mlctrio.runtime.grammar import CompiledGrammar, GrammarCompiler, apply_bitmasks
from mlctrio.runtime.tokenizer import HFTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["a", "b", "c"]},
        "values": {"type": "array", "items": {"type": "number"}},
        "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    },
    "required": ["name", "kind", "values"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]  # fmt: skip


class RandomVocab:
    """A random byte vocabulary with the surface GrammarCompiler reads (no tokenizer.json)."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        alphabet = np.frombuffer(b'abcdefghijklmnopqrstuvwxyz ETAOIN{}[]":,0123456789', np.uint8)
        tokens = [bytes([b]) for b in range(256)]
        seen = set(tokens)
        while len(tokens) < vocab_size - 1:
            token = rng.choice(alphabet, size=int(rng.integers(2, 9))).tobytes()
            if token not in seen:
                seen.add(token)
                tokens.append(token)
        self.tokens = [*tokens, b"<eos>"]
        self.vocab_size = vocab_size
        self.eos_token_ids = (vocab_size - 1,)
        self.bos_token_id = None
        self.special_token_ids = frozenset(self.eos_token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        return None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


def demo_small(cache_dir: Path) -> HFTokenizer:
    path = cache_dir / "bench-small-tokenizer.json"
    if not path.is_file():
        train_demo_tokenizer(8000).save(str(path))
    return HFTokenizer.from_file(path, eos_token_ids=(2,))


def run(
    grammar: CompiledGrammar | None,
    batch: int,
    vocab: int,
    eos: int,
    steps: int,
    executor: Any = None,
) -> tuple[float, float]:
    """(mask µs per step, accept µs per step) over `steps` steps of a `batch`-row batch."""
    rng = np.random.default_rng(0)
    matchers = [grammar.matcher() if grammar else None for _ in range(batch)]
    mask_s = accept_s = 0.0
    bias = np.zeros(vocab, np.float32)
    bias[eos] = 20.0  # finish as soon as allowed, so sequences restart and cover all states
    for _ in range(steps):
        logits = rng.standard_normal((batch, vocab), dtype=np.float32) * 3 + bias
        start = time.perf_counter()
        apply_bitmasks(logits, matchers, executor=executor)
        mask_s += time.perf_counter() - start
        tokens = logits.argmax(axis=1).tolist()
        start = time.perf_counter()
        for i, matcher in enumerate(matchers):
            if matcher is not None:
                assert matcher.accept_token(tokens[i]), matcher.error
                if matcher.is_terminated() and grammar is not None:
                    matchers[i] = grammar.matcher()
        accept_s += time.perf_counter() - start
    return mask_s / steps * 1e6, accept_s / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    tokenizers: dict[str, tuple[Any, int]] = {
        "demo-small 8000": (demo_small(args.cache_dir), 8064),
        "random 32000": (RandomVocab(32000), 32128),
    }
    executor = llguidance.LLExecutor()
    print(f"llguidance {llguidance.__version__}; µs per step (whole batch), {args.steps} steps")
    header = f"{'vocab':<16} {'grammar':<12} {'batch':>5} {'mask':>9} {'mask par':>9} {'accept':>8}"
    print(header)
    print("-" * len(header))
    for label, (tokenizer, model_vocab) in tokenizers.items():
        compiler = GrammarCompiler(tokenizer, vocab_size=model_vocab)
        start = time.perf_counter()
        grammars: dict[str, CompiledGrammar | None] = {
            "none": None,
            "json_object": compiler.json_object(),
            "schema": compiler.json_schema(SCHEMA),
            "tools auto": compiler.tools(TOOLS, "auto"),
        }
        compile_ms = (time.perf_counter() - start) * 1e3
        eos = tokenizer.eos_token_ids[0]
        for name, grammar in grammars.items():
            for batch in (1, 16):
                mask, accept = run(grammar, batch, model_vocab, eos, args.steps)
                par = ""
                if batch > 1 and grammar is not None:
                    par_mask, _ = run(grammar, batch, model_vocab, eos, args.steps, executor)
                    par = f"{par_mask:.0f}"
                print(f"{label:<16} {name:<12} {batch:>5} {mask:>9.0f} {par:>9} {accept:>8.0f}")
        print(f"{label:<16} (compiling the three grammars: {compile_ms:.0f} ms)")


if __name__ == "__main__":
    main()
