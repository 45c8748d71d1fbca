"""The target's final hidden states for a distillation set (the heads' training inputs).

    python scripts/spec_heads/features.py SET.npz OUT.npz [--model embedded://SmolLM2-135M-Instruct]
        [--vocab 4096]

For every sequence of SET.npz (distill.py) the engine's runner computes the final normed hidden
state at every position (`runner.hidden`, the state the LM head reads), stored as float16.
Also written: the draft vocabulary (the `--vocab` ids most frequent among the answers; the heads
score only these, so that a draft costs a fraction of the full LM head) and the model's input
embedding rows (float32, all ids: EAGLE's input is [embedding of the next token, feature]).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mlctrio.config import EngineOverrides, ServerConfig
from mlctrio.runtime.model_loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="embedded://SmolLM2-135M-Instruct")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    data = np.load(args.data)
    tokens, offsets, prompt_lens = data["tokens"], data["offsets"], data["prompt_lens"]
    config = ServerConfig(
        model=args.model, overrides=EngineOverrides(max_num_sequence=16, prefill_chunk_size=2048)
    )
    core, info = load_model(config)
    runner = core.runner
    hidden = np.zeros((len(tokens), info.hidden_size), dtype=np.float16)
    t0 = time.perf_counter()
    n = len(offsets) - 1
    i = 0
    while i < n:  # as many whole sequences per call as fit one prefill chunk
        batch, total = [], 0
        while i < n and len(batch) < 16 and total + offsets[i + 1] - offsets[i] <= 2048:
            batch.append(i)
            total += offsets[i + 1] - offsets[i]
            i += 1
        if not batch:
            raise SystemExit(f"sequence {i} is longer than one prefill chunk")
        for k in range(len(batch)):
            runner.add_sequence(k)
        seqs = [(k, tokens[offsets[s] : offsets[s + 1]]) for k, s in enumerate(batch)]
        rows = runner.hidden(seqs)
        for k in range(len(batch)):
            runner.remove_sequence(k)
        hidden[offsets[batch[0]] : offsets[batch[-1] + 1]] = rows
        if i % 200 < len(batch):
            print(f"{i}/{n} sequences, {time.perf_counter() - t0:.0f} s", flush=True)
    vocab = runner.vocab_size
    embed = np.concatenate([runner.embed_rows(np.arange(a, min(a + 2048, vocab)))
                            for a in range(0, vocab, 2048)])  # fmt: skip
    answers = np.concatenate(
        [tokens[offsets[s] + prompt_lens[s] : offsets[s + 1]] for s in range(n)]
    )
    counts = np.bincount(answers, minlength=vocab)
    draft_vocab = np.sort(np.argsort(-counts, kind="stable")[: args.vocab]).astype(np.int32)
    covered = counts[draft_vocab].sum() / max(1, counts.sum())
    print(f"draft vocabulary: {args.vocab} ids cover {covered:.1%} of answer tokens")
    core.close()
    np.savez(
        args.out,
        tokens=tokens,
        offsets=offsets,
        prompt_lens=prompt_lens,
        hidden=hidden,
        embed=embed.astype(np.float32),
        draft_vocab=draft_vocab,
        target_config=np.array(json.dumps(runner.model_config.to_dict())),
    )
    print(f"wrote {args.out}: {len(tokens)} positions")


if __name__ == "__main__":
    main()
