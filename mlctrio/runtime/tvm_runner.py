"""`TVMRunner`: the `ModelRunner` (engine/runner.py) over a compiled Llama library and its KV cache.

One instance lives on the engine worker thread; it is not thread-safe. Each `step` is:
kv_state_begin_forward -> embed -> batch_decode (every entry 1 token; `decode` for one,
`batch_decode_r2` / `_r8` for 2 and for 5+ where the library has them) or batch_prefill
(otherwise, logits only at each entry's last position) -> kv_state_end_forward. `verify`
(logits at every position) and `hidden` (final hidden states at every position, for
embeddings) run the same way. The KV cache ICHECKs raise on most misuse, but an out-of-range
logit position segfaults inside `take`, so batches are validated here first; validation
failures raise `EngineError` (the scheduler should never send them).

Threads: see tvm_library.configure_threads (the constructor calls it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tvm
import tvm_ffi
from tvm import relax

from mlctrio.engine.runner import LaunchHook
from mlctrio.errors import EngineError, ModelLoadError
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import DECODE_ROW_BLOCKS, decode_row_block
from mlctrio.runtime.hidden_tap import HiddenTap
from mlctrio.runtime.tvm_library import configure_threads, load_library, optional_function

log = logging.getLogger(__name__)


# `score` runs a step of at most this many tokens, every one needing logits, through the decode
# function (one row per token): bench/verify_forms.py measured it at 0.70-0.74x the prefill
# form's time for 2-4 tokens on SmolLM2 (Q4_1, 2 threads), 0.74-0.92x for 5-8 (one, two or four
# sequences), 1.0-1.2x beyond; bench/ngram_replay.py --rows-form-max: F32 and Q8_0 alike.
ROWS_FORM_MAX_TOKENS = 8
# the steps a library with hidden outputs has in a `*_hidden` form (hidden_tap.py)
_TAPPED_STEPS = ("batch_prefill", "batch_decode", "decode")


class TVMRunner:
    """Runs a compiled Llama library. See module docstring for the step protocol."""

    def __init__(
        self,
        lib: str | Path | tvm.runtime.Module,
        params: Sequence[npt.NDArray],
        config: LlamaConfig,
        *,
        max_num_sequence: int,
        max_total_seq_length: int,
        prefill_chunk_size: int,
        page_size: int = 16,
        num_threads: int | None = None,
    ) -> None:
        configure_threads(num_threads)
        self._config = config
        self.launch_hook: LaunchHook | None = None  # see engine.runner.ModelRunner
        self._page_size = page_size
        self._max_num_sequence = max_num_sequence
        self._prefill_chunk_size = prefill_chunk_size
        self._max_total_seq_length = max_total_seq_length
        dev = tvm.cpu()
        mod = lib if isinstance(lib, tvm.runtime.Module) else load_library(lib)
        try:
            self._vm = relax.VirtualMachine(mod, dev)
        except Exception as exc:  # not a Relax VM library
            raise ModelLoadError(f"cannot load compiled model {lib}: {exc}") from exc
        self._params = [tvm.runtime.tensor(np.ascontiguousarray(p), dev) for p in params]
        self._f_embed = self._vm["embed"]
        # the step functions by name ("decode": libraries before cpu-9 lack it; the row-block
        # forms "batch_decode_r2" / "_r8": only libraries with float group kernels have them)
        self._f_steps = {
            "batch_prefill": self._vm["batch_prefill"],
            "batch_decode": self._vm["batch_decode"],
            "decode": optional_function(self._vm, "decode"),
            **{
                f"batch_decode_r{r}": optional_function(self._vm, f"batch_decode_r{r}")
                for r in DECODE_ROW_BLOCKS
            },
        }
        self._f_verify = self._vm["batch_verify"]
        self._f_hidden = optional_function(self._vm, "batch_prefill_to_last_hidden_states")
        # with config.hidden_outputs: the same steps also returning hidden states (hidden_tap.py)
        self._f_tapped = {
            name: optional_function(self._vm, f"{name}_hidden") for name in _TAPPED_STEPS
        }
        for r in DECODE_ROW_BLOCKS:
            self._f_tapped[f"batch_decode_r{r}"] = optional_function(
                self._vm, f"batch_decode_hidden_r{r}"
            )
        self.hidden_tap: HiddenTap | None = None
        #: `score` runs a step of up to this many tokens, each needing logits, through the
        #: decode function (0: never)
        self.rows_form_max = ROWS_FORM_MAX_TOKENS
        shape = tvm_ffi.Shape
        self._kv = self._vm["create_paged_kv_cache"](
            shape([max_num_sequence]),
            shape([max_total_seq_length]),
            shape([prefill_chunk_size]),
            shape([page_size]),
            shape([1 if config.kv_window else 0]),  # the cache's sliding-window mode
        )
        g = tvm.get_global_func
        self._f_add = g("vm.builtin.kv_state_add_sequence")
        self._f_remove = g("vm.builtin.kv_state_remove_sequence")
        self._f_fork = g("vm.builtin.kv_state_fork_sequence")
        self._f_popn = g("vm.builtin.kv_state_popn")
        self._f_begin = g("vm.builtin.kv_state_begin_forward")
        self._f_end = g("vm.builtin.kv_state_end_forward")
        self._f_free_pages = g("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._f_slide = g("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")
        # The cache adds one spare page to ceil(capacity / page_size); report what it really has.
        self._total_pages = int(self._f_free_pages(self._kv))
        self._lengths: dict[int, int] = {}
        self._sliding: set[int] = set()  # sequences in the cache's sliding-window mode

    # -- properties of the ModelRunner protocol -------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._config.vocab_size

    @property
    def model_config(self) -> LlamaConfig:
        return self._config

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def context_window_size(self) -> int:
        return self._config.context_window_size

    @property
    def max_num_sequence(self) -> int:
        return self._max_num_sequence

    @property
    def kv_window(self) -> tuple[int, int] | None:
        """(tokens kept, sink): the cache releases what leaves a sliding window
        (LlamaConfig.kv_window, engine/runner.py)."""
        return self._config.kv_window

    def enable_hidden_tap(self, keep: int) -> HiddenTap:
        """From now on record the last `keep` hidden states of every sequence after each step
        (Medusa and EAGLE drafts read them). EngineError when the library lacks the `*_hidden`
        functions (it was compiled without LlamaConfig.hidden_outputs)."""
        if any(self._f_tapped[name] is None for name in _TAPPED_STEPS):
            raise EngineError("this model library has no hidden-state outputs: compile with them")
        if self.hidden_tap is None or self.hidden_tap.keep < keep:
            self.hidden_tap = HiddenTap(self._config.hidden_size, keep)
        return self.hidden_tap

    def embed_rows(self, token_ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """The model's input embedding of each token id (float32, (n, hidden))."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise EngineError("token id outside the vocabulary")
        out = self._f_embed(tvm.runtime.tensor(ids, tvm.cpu()), self._params).numpy()
        return out.astype(np.float32, copy=False).reshape(ids.size, -1)

    def total_pages(self) -> int:
        return self._total_pages

    def free_pages(self) -> int:
        return int(self._f_free_pages(self._kv))

    # -- sequence management --------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._lengths:
            raise EngineError(f"sequence {seq_id} already exists")
        if len(self._lengths) >= self._max_num_sequence:
            raise EngineError(f"more than max_num_sequence={self._max_num_sequence} sequences")
        self._f_add(self._kv, seq_id)
        self._lengths[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        self._check_seq(seq_id)
        self._f_remove(self._kv, seq_id)
        del self._lengths[seq_id]
        self._sliding.discard(seq_id)
        if self.hidden_tap is not None:
            self.hidden_tap.drop(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Create child from parent's first fork_pos tokens (-1: all of them)."""
        self._check_seq(parent_id)
        if child_id in self._lengths:
            raise EngineError(f"sequence {child_id} already exists")
        if len(self._lengths) >= self._max_num_sequence:
            raise EngineError(f"more than max_num_sequence={self._max_num_sequence} sequences")
        if parent_id in self._sliding:
            raise EngineError(f"sequence {parent_id} slides its window: it cannot be forked")
        parent_len = self._lengths[parent_id]
        if not (fork_pos == -1 or 0 <= fork_pos <= parent_len):
            raise EngineError(f"fork_pos {fork_pos} outside [0, {parent_len}]")
        self._f_fork(self._kv, parent_id, child_id, fork_pos)
        self._lengths[child_id] = parent_len if fork_pos == -1 else fork_pos
        if self.hidden_tap is not None:
            self.hidden_tap.fork(parent_id, child_id, self._lengths[child_id])

    def enable_sliding_window(self, seq_id: int) -> None:
        """From the next step on, the cache keeps only the window's tokens (and the sinks) of
        seq_id and releases the pages before them; it can no longer be forked or popped."""
        self._check_seq(seq_id)
        if self._config.kv_window is None:
            raise EngineError("this model's KV cache has no sliding-window mode")
        kept, sink = self._config.kv_window
        self._f_slide(self._kv, seq_id, kept, sink)
        self._sliding.add(seq_id)

    def popn(self, seq_id: int, num_tokens: int) -> None:
        """Drop the last num_tokens tokens of a sequence from the cache."""
        self._check_seq(seq_id)
        if seq_id in self._sliding and num_tokens:
            raise EngineError(f"sequence {seq_id} slides its window: it cannot be popped")
        if not 0 <= num_tokens <= self._lengths[seq_id]:
            raise EngineError(f"cannot pop {num_tokens} of {self._lengths[seq_id]} tokens")
        if num_tokens:
            self._f_popn(self._kv, seq_id, num_tokens)
            self._lengths[seq_id] -= num_tokens

    def sequence_length(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self._lengths[seq_id]

    def _check_seq(self, seq_id: int) -> None:
        if seq_id not in self._lengths:
            raise EngineError(f"unknown sequence {seq_id}")

    # -- forward --------------------------------------------------------------------------------
    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        """Append each (seq_id, new_token_ids) to the cache and run the model.

        Returns float32 logits (len(batch), vocab_size) at the last new position of each entry.
        """
        seq_ids, lengths, tokens = self._validate(batch)
        logits = self._forward(seq_ids, lengths, tokens, all_positions=False)
        return logits

    def verify(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        """Like `step` but returns logits at EVERY new position: (sum of lengths, vocab_size).

        For speculative decoding: verify draft tokens, then `popn` the rejected ones.
        """
        seq_ids, lengths, tokens = self._validate(batch)
        return self._forward(seq_ids, lengths, tokens, all_positions=True)

    def score(
        self, batch: Sequence[tuple[int, Sequence[int]]], num_logits: Sequence[int]
    ) -> npt.NDArray[np.float32]:
        """Like `step` but with logits at the last num_logits[i] new positions of entry i, in
        batch order: (sum(num_logits), vocab_size). Speculative decoding verifies drafts this
        way (one `batch_prefill` call, its logit positions gathered before the LM head)."""
        seq_ids, lengths, tokens = self._validate(batch)
        if any(not 1 <= k <= n for k, n in zip(num_logits, lengths, strict=True)):
            raise EngineError("num_logits must be in [1, entry length]")
        if len(tokens) <= self.rows_form_max and all(
            k == n for k, n in zip(num_logits, lengths, strict=True)
        ):
            # every new token needs its logits (a step of decodes and drafts): the decode
            # function, each token one row of its (b, 1) matmuls; the cache still attends each
            # entry's tokens causally (it dispatches on the lengths begin_forward was given)
            return self._forward(seq_ids, lengths, tokens, all_positions=False, as_rows=True)
        ends = np.cumsum(lengths, dtype=np.int32)
        pos = np.concatenate(
            [np.arange(e - k, e, dtype=np.int32) for e, k in zip(ends, num_logits, strict=True)]
        )
        return self._forward(seq_ids, lengths, tokens, all_positions=False, positions=pos)

    def hidden(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        """Like `verify` but returns the final hidden states: (sum of lengths, hidden_size)."""
        if self._f_hidden is None:
            raise EngineError("this model library predates embeddings: compile it again")
        seq_ids, lengths, tokens = self._validate(batch)
        return self._forward(seq_ids, lengths, tokens, all_positions=True, hidden=True)

    def _validate(
        self, batch: Sequence[tuple[int, Sequence[int]]]
    ) -> tuple[list[int], list[int], npt.NDArray[np.int32]]:
        if not batch:
            raise EngineError("empty batch")
        seq_ids = [int(s) for s, _ in batch]
        lengths = [len(t) for _, t in batch]
        if len(set(seq_ids)) != len(seq_ids):
            raise EngineError("a sequence appears twice in one batch")
        total = sum(lengths)
        if min(lengths) < 1:
            raise EngineError("every batch entry needs at least one token")
        if total > self._prefill_chunk_size:
            raise EngineError(
                f"{total} tokens exceed prefill_chunk_size {self._prefill_chunk_size}"
            )
        pages_needed = 0
        for sid, n in zip(seq_ids, lengths, strict=True):
            self._check_seq(sid)
            new_len = self._lengths[sid] + n
            if new_len > self.context_window_size:
                raise EngineError(f"sequence {sid} would exceed the context window ({new_len})")
            if sid in self._sliding:
                continue  # it releases pages as it takes them (engine/pages.py counts them)
            ps = self._page_size
            # A partial last page is already owned (TVM copies it at fork time), so only pages
            # beyond the current ceil(len / page_size) are new.
            pages_needed += -(-new_len // ps) - -(-self._lengths[sid] // ps)
        if pages_needed > self.free_pages():
            raise EngineError(f"KV cache out of pages ({pages_needed} > {self.free_pages()})")
        tokens = np.fromiter((t for _, ts in batch for t in ts), dtype=np.int32, count=total)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise EngineError("token id outside the vocabulary")
        return seq_ids, lengths, tokens

    def _forward(
        self,
        seq_ids: list[int],
        lengths: list[int],
        tokens: npt.NDArray[np.int32],
        all_positions: bool,
        hidden: bool = False,
        positions: npt.NDArray[np.int32] | None = None,
        as_rows: bool = False,
    ) -> npt.NDArray[np.float32]:
        dev = tvm.cpu()
        width = self._config.hidden_size
        total = int(tokens.size)
        tap = self.hidden_tap is not None and not all_positions
        fn = self._f_tapped if tap else self._f_steps
        self._f_begin(self._kv, tvm_ffi.Shape(seq_ids), tvm_ffi.Shape(lengths))
        try:
            embeds = self._f_embed(tvm.runtime.tensor(tokens, dev), self._params)
            if self.launch_hook is not None:
                self.launch_hook()
            if all_positions:
                f = self._f_hidden if hidden else self._f_verify
                out = f(embeds._create_view((1, total, width)), self._kv, self._params)
            elif as_rows or (positions is None and all(n == 1 for n in lengths)):
                # one row: the static `decode`; else the cheapest row block, if compiled
                single = fn["decode"] if total == 1 else None
                block = fn.get(f"batch_decode_r{decode_row_block(total)}")
                decode = single or block or fn["batch_decode"]
                out = decode(embeds._create_view((total, 1, width)), self._kv, self._params)
            else:
                # Positions are in range by construction (cumsum of lengths >= 1 each, < total).
                pos = np.cumsum(lengths, dtype=np.int32) - 1 if positions is None else positions
                out = fn["batch_prefill"](
                    embeds._create_view((1, total, width)),
                    tvm.runtime.tensor(pos, dev),
                    self._kv,
                    self._params,
                )
        finally:
            self._f_end(self._kv)
        if tap:
            self._record_hidden(seq_ids, lengths, out[1].numpy().reshape(total, width))
        for sid, n in zip(seq_ids, lengths, strict=True):
            self._lengths[sid] += n
        logits = out[0].numpy()
        return logits.reshape(-1, logits.shape[-1])

    def _record_hidden(
        self, seq_ids: list[int], lengths: list[int], rows: npt.NDArray[np.float32]
    ) -> None:
        assert self.hidden_tap is not None
        at = 0
        for sid, n in zip(seq_ids, lengths, strict=True):
            self.hidden_tap.record(sid, self._lengths[sid], rows[at : at + n])
            at += n

    def close(self) -> None:
        """Drop the KV cache and VM (frees their memory when the last reference goes)."""
        self._lengths.clear()
        self._kv = None
        self._params = []
        self._vm = None
