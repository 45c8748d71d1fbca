"""The seam between the scheduler/worker and a model: `ModelRunner`.

A runner owns the paged KV cache and executes one batched forward step. The TVM runner
(runtime/tvm_runner.py) and the echo fake (testing/echo.py) both implement it. All calls happen on
the single engine worker thread; a runner is not thread-safe.

Sequence ids are small non-negative ints chosen by the caller. Page accounting: a sequence of
length L holds ceil(L / page_size) pages, except that a forked child shares its parent's full
pages (copy-on-write at page granularity, as TVM's paged KV cache does).

`PromptAwareRunner` is an optional extra hook (only the echo fake needs it). Two optional
methods, looked up by name, serve requests that need the model's output at every prompt
position (runtime/forward.py): `verify(batch)` returns the logits at every new position
((sum of lengths, vocab_size): prompt logprobs) and `hidden(batch)` the final hidden states at
every new position ((sum of lengths, hidden_size): embeddings). A runner without them refuses
such requests with an EngineError. A third, `score(batch, num_logits)`, returns the logits at
the last num_logits[i] positions of entry i ((sum of num_logits, vocab_size)): speculative
decoding verifies its drafted tokens with it (runtime/speculative.py). A runner whose cache
releases what leaves a sliding window has `kv_window` ((tokens kept, sink), or None) and
`enable_sliding_window(seq_id)`, which puts a sequence in that mode before a step
(engine/pages.py has the rules, engine/plan.py when it is called).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

LaunchHook = Callable[[], None]


class ModelRunner(Protocol):
    # Called by `step` once, right before the model's main computation (the call that releases
    # the GIL for most of the step), or not at all; None: no hook. The engine worker hands the
    # previous step's outputs to the event loop there, so that the loop's per-token work runs
    # while the model computes instead of holding the GIL the worker needs (see service.py).
    launch_hook: LaunchHook | None

    @property
    def vocab_size(self) -> int: ...

    @property
    def page_size(self) -> int: ...

    @property
    def context_window_size(self) -> int: ...

    @property
    def max_num_sequence(self) -> int: ...

    def total_pages(self) -> int: ...

    def free_pages(self) -> int: ...

    def add_sequence(self, seq_id: int) -> None: ...

    def remove_sequence(self, seq_id: int) -> None: ...

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Create child from parent's first fork_pos tokens (-1: all of them)."""

    def popn(self, seq_id: int, num_tokens: int) -> None:
        """Drop the last num_tokens tokens of a sequence from the cache."""

    def sequence_length(self, seq_id: int) -> int: ...

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        """Append each (seq_id, new_token_ids) to the cache and run the model.

        Returns float32 logits of shape (len(batch), vocab_size): the logits at the LAST new
        position of each entry. Entries may mix prefill chunks (many tokens) and decodes (one).
        A seq_id appears at most once per batch.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class PromptAwareRunner(Protocol):
    """Optional runner hook: told how many of a new sequence's tokens are the prompt.

    Real models do not need it. The echo fake does, because "echo the prompt" is not a function of
    the token sequence alone (chunked prefill and recompute look exactly like generation to it).
    """

    def set_prompt_length(self, seq_id: int, num_prompt_tokens: int) -> None: ...
