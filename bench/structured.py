"""Cost of constrained decoding: decode tok/s with and without a grammar, batch 1 and 16.

Runs the EngineCore in-process on a demo model (no HTTP), every request generating the same
number of tokens (ignore_eos; a schema whose strings can run long so the grammar never ends the
output early), and prints tok/s and the per-token overhead of the mask.

    python bench/structured.py [--model demo://small] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import time

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.engine.types import GenerationRequest, OutputConstraint, SamplingParams
from mlctrio.runtime.model_loader import load_model

# Long free-text strings keep the grammar open for the whole run, so both variants generate
# exactly `tokens` tokens and the only difference is the mask.
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string"}, "more": {"type": "string"}},
    "required": ["story", "more"],
}
CONSTRAINTS = {
    "none": None,
    "json_object": OutputConstraint(kind="json_object"),
    "json_schema": OutputConstraint(kind="json_schema", schema=json.dumps(SCHEMA)),
}


def run(core, batch: int, tokens: int, constraint: OutputConstraint | None) -> float:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, constraint=constraint)
    for i in range(batch):
        core.add_request(GenerationRequest(f"r{time.monotonic_ns()}-{i}", (5, 6, 7, 8), params))
    generated = 0
    start = time.perf_counter()
    while core.has_work():
        for out in core.step():
            generated += sum(len(d.token_ids) for d in out.deltas)
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo://small")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    config = ServerConfig(
        model=args.model,
        mode="server",
        prefix_cache_mode="disable",
        overrides=EngineOverrides(max_num_sequence=16, max_total_seq_length=8192),
    )
    core, _ = load_model(config)
    run(core, 1, 4, CONSTRAINTS["json_object"])  # warm-up: compile grammars, touch kernels
    print(f"{args.model}, {args.tokens} tokens per request, decode tok/s (in-process)\n")
    print(f"{'batch':>5} {'constraint':<12} {'tok/s':>8} {'vs none':>8} {'µs/step extra':>15}")
    for batch in (1, 16):
        base = 0.0
        for name, constraint in CONSTRAINTS.items():
            rate = run(core, batch, args.tokens, constraint)
            if constraint is None:
                base = rate
            extra = (1 / rate - 1 / base) * 1e6 * batch if base else 0.0
            print(f"{batch:>5} {name:<12} {rate:>8.1f} {rate / base:>7.2f}x {extra:>15.0f}")
    core.close()


if __name__ == "__main__":
    main()
