"""What a request computes over its prompt besides the next token: prompt logprobs and embeddings.

`PromptOutputs` holds one request's running results; `EngineCore` (runtime/core.py) feeds it the
model's output at every position of each prefill chunk of such a request (the runner's `verify`
logits, or its `hidden` states for an embedding request) and reads the result once the prompt is
computed.

Rules:

* Results are kept by absolute prompt position, so a chunk computed again (a recompute after a
  preemption) overwrites what it computed before instead of adding to it. Mean pooling keeps a
  running sum that restarts with a chunk at position 0 (chunks of one sequence come in order,
  and such requests never start from a prefix-cache hit: engine/scheduler.py).
* The logprob of prompt token i comes from the logits at position i - 1 (log-softmax over the
  ids the tokenizer knows); token 0 gets None, as in vLLM and OpenAI's echo. Positions at or past
  the end of the prompt are the sampler's, not ours.
* Pooled embeddings are returned as computed (float32 values, not normalised): normalising,
  truncating to `dimensions` and encoding are the API's job.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np
import numpy.typing as npt

from ..engine.types import GenerationRequest, Pooling, TokenLogprob, TopLogprob

TokenStr = Callable[[int], tuple[str, tuple[int, ...]]]  # id -> (text, utf-8 bytes)


@attrs.define
class PromptOutputs:
    """One request's prompt logprobs and/or pooled hidden state, as its chunks are computed."""

    prompt: tuple[int, ...]
    top_k: int | None  # prompt logprobs wanted (k alternatives), or None
    pooling: Pooling | None
    logprobs: list[TokenLogprob | None] = attrs.field(init=False)
    _pooled: npt.NDArray[np.float64] | None = None
    _delivered: bool = False

    def __attrs_post_init__(self) -> None:
        self.logprobs = [None] * len(self.prompt) if self.top_k is not None else []

    @classmethod
    def for_request(cls, spec: GenerationRequest) -> PromptOutputs | None:
        """The accumulator a request needs, or None for a plain generation request."""
        if not spec.needs_every_position:
            return None
        return cls(tuple(spec.prompt_token_ids), spec.params.prompt_logprobs, spec.pooling)

    def covers(self, start: int) -> bool:
        """Whether a chunk starting at `start` holds prompt positions this request still needs
        computed at every position (after the prompt, a plain step is enough)."""
        return start < len(self.prompt) and not self._delivered

    def add_logits(
        self, start: int, rows: npt.NDArray[np.float32], vocab: int, token_str: TokenStr
    ) -> None:
        """Logits at positions start .. start + len(rows) - 1 (rows of the verify output)."""
        if self.top_k is None:
            return
        # Row j predicts the token at start + j + 1: only targets inside the prompt count.
        n = min(len(rows), len(self.prompt) - 1 - start)
        if n <= 0:
            return
        logits = rows[:n, :vocab].astype(np.float32, copy=False)
        peak = logits.max(axis=1, keepdims=True)
        logz = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        targets = np.asarray(self.prompt[start + 1 : start + 1 + n], dtype=np.int64)
        chosen = logits[np.arange(n), targets] - logz
        tops: list[tuple[TopLogprob, ...]] = [()] * n
        if self.top_k:
            k = min(self.top_k, vocab)
            part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            for j in range(n):
                ids = part[j][np.argsort(-logits[j, part[j]], kind="stable")]
                tops[j] = tuple(
                    TopLogprob(int(t), *_text(token_str, int(t), float(logits[j, t] - logz[j])))
                    for t in ids
                )
        for j in range(n):
            tid = int(targets[j])
            text, raw = token_str(tid)
            self.logprobs[start + 1 + j] = TokenLogprob(tid, text, float(chosen[j]), raw, tops[j])

    def add_hidden(self, start: int, rows: npt.NDArray[np.float32]) -> None:
        """Final hidden states at positions start .. start + len(rows) - 1."""
        n = min(len(rows), len(self.prompt) - start)
        if self.pooling is None or n <= 0:
            return
        if self.pooling == "mean":
            total = rows[:n].sum(axis=0, dtype=np.float64)
            self._pooled = total if start == 0 or self._pooled is None else self._pooled + total
        elif self.pooling == "cls":
            if start == 0:
                self._pooled = rows[0].astype(np.float64)
        elif start + n == len(self.prompt):  # "last"
            self._pooled = rows[n - 1].astype(np.float64)

    def take_logprobs(self) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt logprobs, once (on the record where the prompt's computation ends)."""
        if self.top_k is None or self._delivered:
            return None
        self._delivered = True
        return tuple(self.logprobs)

    def embedding(self) -> npt.NDArray[np.float32]:
        """The pooled hidden state (the whole prompt must have been added)."""
        if self._pooled is None:
            raise RuntimeError("the prompt's hidden states were never computed")
        pooled = self._pooled / len(self.prompt) if self.pooling == "mean" else self._pooled
        self._delivered = True
        return pooled.astype(np.float32)


def _text(token_str: TokenStr, token_id: int, logprob: float) -> tuple[str, float, tuple[int, ...]]:
    text, raw = token_str(token_id)
    return text, logprob, raw
