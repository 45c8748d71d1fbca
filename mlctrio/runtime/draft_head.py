"""`DraftHead`: the target's LM head restricted to a draft vocabulary, in numpy.

Medusa heads and EAGLE's draft layer end in the target's (tied) LM head. Scoring all of a
large vocabulary costs about as much as a target step's weights on a small model (SmolLM2:
49152 x 576), so the heads score only the ids they were trained on (the most frequent in the
target's answers; 4096 cover ~97% of them). A token outside that set is never drafted, which
can only cost acceptance: verification keeps the output exact.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@attrs.frozen
class DraftHead:
    vocab: npt.NDArray[np.int32]  # (N,) target ids
    rows: F32  # (N, hidden): the LM head's rows for them

    @classmethod
    def from_runner(cls, runner: Any, vocab: npt.NDArray[np.int32]) -> DraftHead:
        """The rows of a tied LM head: the target's input embedding (over its scale)."""
        config = runner.model_config
        if not config.tie_word_embeddings:
            from ..errors import ConfigError

            raise ConfigError(
                "Medusa and EAGLE heads need a model whose LM head is its embedding (tied)"
            )
        rows = runner.embed_rows(vocab) / np.float32(config.embed_scale)
        return cls(np.asarray(vocab, np.int32), np.ascontiguousarray(rows, np.float32))

    def argmax(self, x: F32) -> npt.NDArray[np.int64]:
        """Target ids of the best-scoring draft-vocabulary entry of each row of x (..., hidden)."""
        ids: npt.NDArray[np.int64] = self.vocab[np.argmax(x @ self.rows.T, axis=-1)].astype(
            np.int64
        )
        return ids


def silu(x: F32) -> F32:
    out: F32 = (x / (1.0 + np.exp(-x))).astype(np.float32, copy=False)
    return out


def rms_norm(x: F32, weight: F32, eps: float) -> F32:
    out: F32 = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight
    return out
