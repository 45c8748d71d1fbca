"""`--speculative-mode medusa`: heads over the target's last hidden state draft k tokens at once.

Medusa (Cai et al. 2024): head i is a residual block `h + SiLU(W_i h + b_i)` under the target's
LM head and predicts the token i + 2 positions after the one whose hidden state h is (the
target's own head predicts the next). The hidden state is the one the target computed at a
choice's last cached position, whose logits gave its pending token: head i's argmax is draft
token i + 1 after the pending one.

Rules:

* Drafts are greedy (argmax over the draft vocabulary, runtime/draft_head.py): deterministic,
  as the core's exact verification requires (runtime/speculative.py).
* No hidden state held for that position (the runner's tap, runtime/hidden_tap.py): no draft.
* All drafting choices go through the heads in one batched matmul per head set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ..engine.request import Branch
from .draft_head import F32, DraftHead, silu
from .hidden_tap import HiddenTap


@attrs.frozen
class MedusaHeads:
    weight: F32  # (k, hidden, hidden)
    bias: F32  # (k, hidden)
    head: DraftHead

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], head: DraftHead) -> MedusaHeads:
        k = 0
        while f"medusa_head.{k}.0.linear.weight" in tensors:
            k += 1
        weight = np.stack([tensors[f"medusa_head.{i}.0.linear.weight"] for i in range(k)])
        bias = np.stack([tensors[f"medusa_head.{i}.0.linear.bias"] for i in range(k)])
        return cls(weight.astype(np.float32), bias.astype(np.float32), head)

    def predict(self, h: F32, k: int) -> np.ndarray:
        """(B, k) draft ids from hidden states h (B, hidden), using the first k heads."""
        w, b = self.weight[:k], self.bias[:k]
        x = h[:, None, :] + silu(np.einsum("bd,kod->bko", h, w) + b[None])
        return self.head.argmax(x)


class MedusaProposer:
    """The Proposer (runtime/speculative.py) of `--speculative-mode medusa`."""

    def __init__(self, heads: MedusaHeads, tap: HiddenTap) -> None:
        self.heads = heads
        self.tap = tap

    @property
    def max_length(self) -> int:
        return self.heads.num_heads

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in branches]
        rows, which = [], []
        for i, (b, k) in enumerate(zip(branches, want, strict=True)):
            at = b.num_tokens - 2  # the last cached position: its logits gave the pending token
            h = self.tap.rows(b.seq_id, at, at + 1) if k > 0 and b.seq_id is not None else None
            if h is not None:
                rows.append(h[0])
                which.append(i)
        if not rows:
            return out
        k = min(max(want), self.heads.num_heads)
        drafts = self.heads.predict(np.stack(rows), k)
        for i, d in zip(which, drafts, strict=True):
            out[i] = [int(t) for t in d[: want[i]]]
        return out
