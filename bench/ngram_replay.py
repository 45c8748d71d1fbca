"""How far n-gram drafting can go on a workload: the target's own greedy answers replayed through
the prompt-lookup proposer, with verification costs measured in process.

    python bench/ngram_replay.py [--model FILE.gguf | embedded://SmolLM2-135M-Instruct]
        [--workloads copy,chat] [--max-tokens 128] [--repeat 7] [--rows-form-max N]

Two parts. In process (no server): the plain engine's greedy answers to bench/speculative.py's
prompts (what every exact mode must produce), and the cost of a step that scores T tokens of
one 200-token sequence, as `TVMRunner.score` runs it, for T = 1 .. NGRAM_MAX_DRAFT + 1. Then the
replay, without the model: at each step the proposer sees the prompt and the answer so far; a
draft of k tokens keeps its first tokens while they equal the answer, plus the one token every
step samples. Per policy it prints steps, drafted / kept tokens, tokens per step and the decode
time the measured costs give, as a ratio to plain decoding (one token per step):

- `k=N`: always draft what the proposer offers, up to N tokens;
- `adaptive`: `DraftPolicy` as `--speculative-mode ngram` runs it (runtime/speculative.py):
  proposals not drafted are scored against what followed, the costs are the measured ones;
- `oracle`: drafts exactly the tokens that will hold (an upper bound for this proposer).

The ratio leaves out prefill, which speculation does not change: bench/speculative.py's
end-to-end ratios sit below it. Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

if __package__ in (None, ""):  # run as a script: make the `bench` namespace package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.verify_forms import timed
from mlctrio.engine.drafts import NgramProposer
from mlctrio.runtime.spec_loader import NGRAM_MAX_DRAFT
from mlctrio.runtime.spec_policy import DraftPolicy
from mlctrio.runtime.speculative import matched_prefix

CONTEXT = 200  # tokens the timed sequence holds before the scored ones


@attrs.define
class Replay:
    """What one policy's replay of one answer did: (drafted, kept) per step."""

    steps: list[tuple[int, int]] = attrs.field(factory=list)

    @property
    def tokens(self) -> int:
        return sum(kept + 1 for _, kept in self.steps)

    def decode_seconds(self, cost: Sequence[float]) -> float:
        """The steps' time with `cost[t]` seconds for a step of t + 1 tokens."""
        return sum(cost[min(drafted, len(cost) - 1)] for drafted, _ in self.steps)


def kept_prefix(draft: Sequence[int], answer: Sequence[int], at: int) -> int:
    """How many tokens of `draft` equal answer[at:] from the start."""
    return matched_prefix(draft, answer[at : at + len(draft)])


def replay(
    prompt: Sequence[int], answer: Sequence[int], policy: str, cost: Sequence[float],
    max_draft: int = NGRAM_MAX_DRAFT,
) -> Replay:  # fmt: skip
    """Replay `answer` (its first token comes from the prompt's prefill) under `policy`:
    "k=N", "adaptive" or "oracle" (see the module docstring)."""
    lookup = NgramProposer()
    out = Replay()
    adaptive = DraftPolicy(max_length=max_draft) if policy == "adaptive" else None
    unverified: tuple[int, list[int]] | None = None
    i = 1
    while i < len(answer):
        room = min(max_draft, len(answer) - i - 1)  # the step's own token counts too
        proposal = lookup.propose([*prompt, *answer[:i]], room)
        if adaptive is not None:
            if unverified is not None:  # as Speculator._check_unverified scores it
                at, old = unverified
                seen = answer[at : min(i, at + len(old))]
                adaptive.observe_draft(0, len(seen), matched_prefix(old, seen))
                unverified = None
            k = adaptive.choose([0], [len(proposal)], 1, explore=False)
            if not k and proposal:
                unverified = (i, proposal)
        elif policy == "oracle":
            k = kept_prefix(proposal, answer, i)
        else:
            k = int(policy.removeprefix("k="))
        draft = proposal[:k]
        kept = kept_prefix(draft, answer, i)
        if adaptive is not None:
            adaptive.observe_step(1, 1 + len(draft), cost[min(len(draft), len(cost) - 1)])
            if draft:
                adaptive.observe_draft(0, len(draft), kept)
        out.steps.append((len(draft), kept))
        i += kept + 1
    return out


def measure_costs(runner, max_tokens: int, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Median seconds of scoring t + 1 tokens of one CONTEXT-token sequence, t = 0..max_tokens-1,
    in the form the runner picks (verify_forms.timed)."""
    runner.add_sequence(0)
    runner.step([(0, [(17 * i) % 1000 + 100 for i in range(CONTEXT)])])
    costs = [timed(runner, None, [(0, [300 + j for j in range(t + 1)])], repeat) / 1e3
             for t in range(max_tokens)]  # fmt: skip
    runner.remove_sequence(0)
    return costs


def greedy_answers(core, info, texts: Sequence[str], max_tokens: int):  # type: ignore[no-untyped-def]
    """(prompt ids, answer ids) of each chat prompt, greedy, one at a time."""
    from mlctrio.engine.types import GenerationRequest, SamplingParams
    from mlctrio.protocol.chat import UserMessage
    from mlctrio.server.prompts import render_chat

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    pairs = []
    for n, text in enumerate(texts):
        msg = UserMessage(role="user", content=text)
        _, ids = render_chat([msg], None, info.chat_template, info.tokenizer)
        core.add_request(GenerationRequest(f"r{n}", tuple(ids), params, time.monotonic()))
        answer: list[int] = []
        while core.has_work():
            for o in core.step():
                for d in o.deltas:
                    answer.extend(d.token_ids)
        pairs.append((list(ids), answer))
    return pairs


def report(name: str, pairs, cost: Sequence[float], policies: Sequence[str]) -> None:  # type: ignore[no-untyped-def]
    plain_tokens = sum(len(a) - 1 for _, a in pairs)
    plain = plain_tokens * cost[0]
    print(f"\n{name}: {len(pairs)} answers, {plain_tokens} tokens after the first")
    print("| policy | steps | drafted | kept | tokens/step | decode ms | vs plain |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    print(f"| plain | {plain_tokens} | 0 | 0 | 1.00 | {plain * 1e3:.0f} | 1.00x |")
    for policy in policies:
        runs = [replay(p, a, policy, cost) for p, a in pairs]
        steps = sum(len(r.steps) for r in runs)
        drafted = sum(d for r in runs for d, _ in r.steps)
        kept = sum(k for r in runs for _, k in r.steps)
        secs = sum(r.decode_seconds(cost) for r in runs)
        assert sum(r.tokens for r in runs) == plain_tokens
        print(f"| {policy} | {steps} | {drafted} | {kept} | {plain_tokens / steps:.2f} | "
              f"{secs * 1e3:.0f} | {plain / secs:.2f}x |")  # fmt: skip


def main() -> None:
    from bench.speculative import WORKLOADS
    from mlctrio.config import EngineOverrides, ServerConfig
    from mlctrio.runtime.model_loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded://SmolLM2-135M-Instruct")
    ap.add_argument("--activations", default="auto")
    ap.add_argument("--workloads", default="copy,chat")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rows-form-max",
        type=int,
        default=None,
        help="score up to this many tokens in the rows form (TVMRunner.rows_form_max)",
    )
    args = ap.parse_args()
    overrides = EngineOverrides(num_threads=args.threads)
    config = ServerConfig(model=args.model, activations=args.activations, overrides=overrides)
    core, info = load_model(config)
    try:
        if args.rows_form_max is not None:
            core.runner.rows_form_max = args.rows_form_max
        cost = measure_costs(core.runner, NGRAM_MAX_DRAFT + 1, args.repeat)
        print(f"{args.model} ({args.activations} activations), {args.threads} threads")
        print("scoring T tokens of one sequence, ms (median of "
              f"{args.repeat}), and as decode steps:")  # fmt: skip
        print(" ".join(f"T={t + 1}: {c * 1e3:.1f} ({c / cost[0]:.2f})" for t, c in enumerate(cost)))
        policies = ["k=2", "k=4", "k=8", f"k={NGRAM_MAX_DRAFT}", "adaptive", "oracle"]
        for name in args.workloads.split(","):
            pairs = greedy_answers(core, info, WORKLOADS[name], args.max_tokens)
            report(name, pairs, cost, policies)
    finally:
        core.close()


if __name__ == "__main__":
    main()
