"""Self-distillation set: the served model's own greedy answers to varied chat prompts.

    python scripts/spec_heads/distill.py OUT.npz [--model embedded://SmolLM2-135M-Instruct]
        [--prompts 1200] [--max-tokens 160] [--batch 16]

Runs the engine in process (no server), renders each prompt with the model's chat template,
decodes greedily, and writes the token ids of every (prompt, answer) pair: `tokens` (all ids,
concatenated), `offsets` (where each sequence starts; one more than sequences) and
`prompt_lens`. Hidden states are not stored: train.py recomputes them (they are the target's
final normed hidden states, which `runner.hidden` returns for every position).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from prompts import make_prompts

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.protocol.chat import UserMessage
from mlctrio.runtime.model_loader import load_model
from mlctrio.server.prompts import render_chat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="embedded://SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=1200)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = ServerConfig(
        model=args.model,
        overrides=EngineOverrides(max_num_sequence=args.batch, prefill_chunk_size=1024),
    )
    core, info = load_model(config)
    texts = make_prompts(args.prompts, args.seed)
    prompts = []
    for text in texts:
        msg = UserMessage(role="user", content=text)
        _, ids = render_chat([msg], None, info.chat_template, info.tokenizer)
        prompts.append(tuple(ids))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    answers: dict[str, list[int]] = {}
    queue = list(enumerate(prompts))
    live = 0
    t0, made = time.perf_counter(), 0
    while queue or core.has_work():
        while queue and live < args.batch:
            i, ids = queue.pop(0)
            core.add_request(GenerationRequest(f"p{i}", ids, params, time.monotonic()))
            answers[f"p{i}"] = []
            live += 1
        for out in core.step():
            for d in out.deltas:
                answers[out.request_id].extend(d.token_ids)
                made += len(d.token_ids)
            if out.finished:
                live -= 1
                done = len(answers) - live
                if done % 50 == 0:
                    rate = made / (time.perf_counter() - t0)
                    print(
                        f"{done}/{len(prompts)} answers, {made} tokens, {rate:.0f} tok/s",
                        flush=True,
                    )
    core.close()
    seqs = [list(prompts[i]) + answers[f"p{i}"] for i in range(len(prompts))]
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    np.savez_compressed(
        args.out,
        tokens=np.array([t for s in seqs for t in s], dtype=np.int32),
        offsets=offsets,
        prompt_lens=np.array([len(p) for p in prompts], dtype=np.int32),
    )
    print(f"wrote {args.out}: {len(seqs)} sequences, {offsets[-1]} tokens, {made} generated")


if __name__ == "__main__":
    main()
