"""Does a long prompt stall running streams? Inter-token latency with and without chunked prefill.

8 streams decode; then a 2,000-token prompt arrives. With chunked prefill (prefill_chunk_size
256) the scheduler mixes each prompt chunk with the running decodes, so each stream keeps getting
a token every step; without it (chunk >= prompt, and the engine's cap on prompt tokens in a
decoding step, `max_prefill_tokens_while_decoding`, raised to match) one step carries the whole
prompt and every stream waits for it. Prints the streams' ITL (p50, p99, max) before and after
the arrival, and the long prompt's time to first token (what the chunking costs it).

    python bench/prefill_stall.py [--model demo://small] [--prompt-tokens 2000]
"""

from __future__ import annotations

import argparse
import time

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.runtime.model_loader import load_model


def run(model: str, chunk: int, prompt_tokens: int) -> dict[str, list[float]]:
    config = ServerConfig(
        model=model,
        mode="server",
        overrides=EngineOverrides(
            max_num_sequence=16,
            prefill_chunk_size=chunk,
            max_total_seq_length=16384,
            max_prefill_tokens_while_decoding=chunk,  # else the 256 cap hides "unchunked"
        ),
    )
    core, _ = load_model(config)
    vocab = core.runner.vocab_size
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    for i in range(8):
        core.add_request(GenerationRequest(f"s{i}", tuple(range(10 + i, 74 + i)), params))
    last: dict[str, float] = {}
    gaps: dict[str, list[float]] = {"before": [], "during": []}
    phase = "before"
    steps = 0
    long_done = False
    while core.has_work():
        if steps == 30:
            prompt = tuple((7 * k) % (vocab - 10) + 5 for k in range(prompt_tokens))
            core.add_request(GenerationRequest("long", prompt, SamplingParams(max_tokens=1)))
            phase = "during"
            arrived = time.perf_counter()
        outputs = core.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            if out.request_id == "long":
                if out.finished and not long_done:
                    gaps["ttft"] = [now - arrived]
                long_done = long_done or out.finished
                continue
            if out.request_id in last:
                gaps[phase].append(now - last[out.request_id])
            last[out.request_id] = now
        if long_done:
            for rid in list(last):
                core.abort_request(rid)
            long_done = False
            phase = "after"
            gaps.setdefault("after", [])
    core.close()
    return gaps


def _ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo://small")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for label, chunk in (("chunked (256)", 256), ("unchunked", max(2048, args.prompt_tokens))):
        gaps = run(args.model, chunk, args.prompt_tokens)
        rows.append((label, gaps))
    print(f"8 running streams; a {args.prompt_tokens}-token prompt arrives at step 30\n")
    print(
        f"{'prefill':<15} {'phase':<8} {'ITL p50 ms':>11} {'p99 ms':>8} {'max ms':>8} "
        f"{'long prompt TTFT ms':>20}"
    )
    for label, gaps in rows:
        for phase in ("before", "during"):
            g = gaps[phase]
            ttft = f"{1000 * gaps['ttft'][0]:>20.0f}" if phase == "during" else ""
            print(
                f"{label:<15} {phase:<8} {_ms(g, 0.5):>11.1f} {_ms(g, 0.99):>8.1f} "
                f"{1000 * max(g):>8.1f} {ttft}"
            )


if __name__ == "__main__":
    main()
