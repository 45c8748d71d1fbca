"""One step's batch on the runner: one model call for most steps, up to three for mixed ones.

Rules:

* A batch of plain entries is one `runner.step` call and nothing else (the common path pays
  nothing for the features below).
* An entry whose request still needs the model's output at every prompt position
  (`PromptOutputs.covers`) goes through `runner.verify` (logits at every position: prompt
  logprobs) or, for an embedding request, `runner.hidden` (final hidden states at every
  position); those rows are handed to the request's `PromptOutputs`. The other entries of the
  step still go through `step`, so a long prompt asking for logprobs does not make the whole
  batch pay for logits at every position.
* A decode entry carrying drafted tokens (`BatchEntry.num_draft`, speculative decoding) needs
  the logits at each of its num_draft + 1 positions: when the step has one, the plain entries go
  through `runner.score` (one call, one row per plain entry plus one per draft token) instead of
  `step`.
* The returned logits have one row per entry, in plan order: the row a sampled token is drawn
  from. An embedding entry's row is zeros (it never samples). The second value maps each
  drafted entry's index to its num_draft + 1 rows, the pending token's position first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..engine.runner import ModelRunner
from ..engine.scheduler import BatchEntry
from ..errors import EngineError
from .prompt_outputs import PromptOutputs, TokenStr

Logits = npt.NDArray[np.float32]


def forward(
    runner: ModelRunner,
    entries: Sequence[BatchEntry],
    prompts: Sequence[PromptOutputs | None],
    vocab: int,
    token_str: TokenStr,
) -> tuple[Logits, dict[int, Logits]]:
    """Run `entries` (with each one's `PromptOutputs`, or None); returns their logits rows and
    the rows of each drafted entry (see the module rules)."""
    batch = [(e.seq_id, e.token_ids) for e in entries]
    every = [
        (k, p)
        for k, (e, p) in enumerate(zip(entries, prompts, strict=True))
        if p is not None and p.covers(e.start)
    ]
    drafted = any(e.num_draft for e in entries)
    if not every and not drafted:
        return runner.step(batch), {}
    chosen = {k for k, _ in every}
    plain = [k for k in range(len(entries)) if k not in chosen]
    out: Logits | None = None
    spec_rows: dict[int, Logits] = {}
    if plain and drafted:
        score = getattr(runner, "score", None)
        if score is None:
            raise EngineError("this model cannot verify drafted tokens")
        counts = [entries[k].num_draft + 1 for k in plain]
        rows = score([batch[k] for k in plain], counts)
        out = _rows_for(len(entries), rows.shape[1])
        for k, block in zip(plain, np.split(rows, np.cumsum(counts)[:-1]), strict=True):
            out[k] = block[-1]
            if entries[k].num_draft:
                spec_rows[k] = block
    elif plain:
        rows = runner.step([batch[k] for k in plain])
        out = _rows_for(len(entries), rows.shape[1])
        out[plain] = rows
    logits_all = [(k, p) for k, p in every if p.pooling is None]
    if logits_all:
        verify = getattr(runner, "verify", None)
        if verify is None:
            raise EngineError("this model cannot compute prompt logprobs")
        rows = verify([batch[k] for k, _ in logits_all])
        out = out if out is not None else _rows_for(len(entries), rows.shape[1])
        for (k, p), chunk in zip(logits_all, _split(rows, entries, logits_all), strict=True):
            p.add_logits(entries[k].start, chunk, vocab, token_str)
            out[k] = chunk[-1]
    hidden = [(k, p) for k, p in every if p.pooling is not None]
    if hidden:
        hidden_of = getattr(runner, "hidden", None)
        if hidden_of is None:
            raise EngineError("this model cannot compute embeddings")
        rows = hidden_of([batch[k] for k, _ in hidden])
        for (k, p), chunk in zip(hidden, _split(rows, entries, hidden), strict=True):
            p.add_hidden(entries[k].start, chunk)
    return (out if out is not None else _rows_for(len(entries), runner.vocab_size)), spec_rows


def _rows_for(num_entries: int, width: int) -> Logits:
    return np.zeros((num_entries, width), dtype=np.float32)


def _split(
    rows: npt.NDArray[np.float32],
    entries: Sequence[BatchEntry],
    picked: Sequence[tuple[int, PromptOutputs]],
) -> list[npt.NDArray[np.float32]]:
    """Cut the per-position rows of a verify/hidden call into one block per picked entry."""
    bounds = np.cumsum([len(entries[k].token_ids) for k, _ in picked])[:-1]
    return np.split(rows, bounds)
