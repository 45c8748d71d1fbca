"""The echo fake model behind `mlctrio serve mock://echo` and the engine tests.

`EchoRunner` is a `ModelRunner` with real page accounting and a trivially predictable model:

* generation step i emits prompt token i (the prompt is echoed back one token per step), then the
  tokenizer's EOS once the whole prompt has been echoed. With ignore_eos the engine bans every
  end-of-generation token; the fake then emits its filler token ("~", `FILLER`) in their place.
  So max_tokens < prompt length finishes with "length", a stop string inside the prompt with "stop".
* The logits put all the mass on that token (0 for it, -1e3 for the filler, -1e4 for every other
  id), so any sampling parameters (temperature, top_p, penalties, seeds) give the same echo.
* "The prompt" is not a property of a token sequence: a chunked prefill, or the recompute of prompt
  + generated tokens after a preemption, looks exactly like generation to a runner. So the engine
  tells the fake through the optional `set_prompt_length(seq_id, n)` hook (`PromptAwareRunner` in
  runtime/core.py), called right after `add_sequence`; a forked child inherits its parent's. A
  sequence the hook was never called for takes the tokens of its first step as its prompt.
* Pages: page_size tokens per page; a sequence of L tokens holds ceil(L / page_size) pages; a fork
  shares the parent's full pages by refcount and copies the partial last page; appending to a shared
  partial page (possible only after popn) copies it first. This bookkeeping is written separately
  from engine/pages.py on purpose: the tests compare the two.
* `delay_s` sleeps inside step(), releasing the GIL as a real TVM call does.
* `verify` gives at every new position the logits `step` would have given had the entry ended
  there; `hidden` gives, at every position, `HIDDEN_SIZE` features of that token alone
  (cos(id * k), k = 1..8), so an embedding is a function of the prompt's tokens only.

`ByteTokenizer` (256 byte tokens + <|endoftext|>, <|im_start|>, <|im_end|>) and `RawChatTemplate`
(message contents joined by "\\n") complete the fake; `build_echo_core` wires them into an
`EngineCore`.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from ..config import EngineConfig, PrefixCacheMode
from ..engine.runner import LaunchHook
from ..errors import EngineError
from ..runtime.core import EngineCore

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_SPECIALS = (ENDOFTEXT, IM_START, IM_END)
_MASKED_LOGIT = -1e4
_FILLER_LOGIT = -1e3  # the runner-up: sampled only when the echoed token is banned
FILLER = "~"
HIDDEN_SIZE = 8  # width of the fake's "hidden states" (its embeddings)


class ByteDetokenizer:
    """Incremental UTF-8 decoding: bytes of an unfinished character are held back."""

    def __init__(self, tokenizer: ByteTokenizer, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._skip and self._tokenizer.is_special(token_id):
            return ""
        return str(self._decoder.decode(self._tokenizer.token_bytes(token_id)))

    def flush(self) -> str:
        return str(self._decoder.decode(b"", final=True))


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; the special tokens follow. Special-token text in the input
    encodes to the special id (as HF tokenizers do)."""

    def __init__(self) -> None:
        self._special_ids = {text: 256 + i for i, text in enumerate(_SPECIALS)}
        self._special_text = {i: text.encode() for text, i in self._special_ids.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(_SPECIALS)

    @property
    def eos_token_ids(self) -> Sequence[int]:
        return (self._special_ids[ENDOFTEXT],)

    @property
    def bos_token_id(self) -> int | None:
        return None

    def special_id(self, text: str) -> int:
        return self._special_ids[text]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_text

    def min_token_count(self, text: str) -> int:
        """A lower bound on len(encode(text)), cheap: one token a byte, less what special-token
        matches save (over-counting overlapping matches only lowers the bound)."""
        count = len(text.encode())
        for special in _SPECIALS:
            count -= text.count(special) * (len(special.encode()) - 1)
        return max(count, 0)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in _SPECIALS if s in rest]
            if not hits:
                ids.extend(rest.encode())
                break
            at, special = min(hits)
            ids.extend(rest[:at].encode())
            ids.append(self._special_ids[special])
            rest = rest[at + len(special) :]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raw = b"".join(
            self.token_bytes(t)
            for t in token_ids
            if not (skip_special_tokens and self.is_special(t))
        )
        return raw.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < 256:
            return bytes((token_id,))
        if token_id in self._special_text:
            return self._special_text[token_id]
        raise ValueError(f"token id {token_id} outside the byte vocabulary")

    def detokenizer(self, skip_special_tokens: bool = True) -> ByteDetokenizer:
        return ByteDetokenizer(self, skip_special_tokens)


@attrs.frozen
class RawChatTemplate:
    """Renders the messages' text contents joined by "\\n": an echo of a chat is the user's text."""

    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = (256 + _SPECIALS.index(IM_END),)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,  # no jinja: nothing reads them
    ) -> str:
        parts = []
        for message in messages:
            content = message.get("content") or ""
            if not isinstance(content, str):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            parts.append(content)
        return "\n".join(parts)


@attrs.define
class _EchoSeq:
    tokens: list[int] = attrs.field(factory=list)
    pages: list[int] = attrs.field(factory=list)
    prompt_length: int | None = None


class EchoRunner:
    """A `ModelRunner` (and `PromptAwareRunner`) echoing the prompt; see the module docstring."""

    def __init__(
        self,
        *,
        vocab_size: int,
        eos_token_id: int,
        total_pages: int = 512,
        page_size: int = 16,
        max_num_sequence: int = 8,
        context_window_size: int = 2048,
        delay_s: float = 0.0,
        filler_token_id: int | None = None,
    ) -> None:
        self._vocab_size = vocab_size
        self._eos = eos_token_id
        self._filler = filler_token_id
        self._total_pages = total_pages
        self._page_size = page_size
        self._max_num_sequence = max_num_sequence
        self._context_window_size = context_window_size
        self.delay_s = delay_s
        self.launch_hook: LaunchHook | None = None  # see engine.runner.ModelRunner
        self._refcount = [0] * total_pages
        self._free = list(range(total_pages))
        self._seqs: dict[int, _EchoSeq] = {}
        self._failure: BaseException | None = None
        self.num_steps = 0
        self.num_tokens_total = 0  # tokens appended by step(): prefill work is visible to tests
        self.closed = False

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def context_window_size(self) -> int:
        return self._context_window_size

    @property
    def max_num_sequence(self) -> int:
        return self._max_num_sequence

    def total_pages(self) -> int:
        return self._total_pages

    def free_pages(self) -> int:
        return len(self._free)

    def sequence_ids(self) -> list[int]:
        return sorted(self._seqs)

    def pages_of(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._seqs[seq_id].pages)

    def tokens_of(self, seq_id: int) -> tuple[int, ...]:
        """The tokens in the cache for seq_id (tests compare them with the prefix cache's)."""
        return tuple(self._seqs[seq_id].tokens)

    def fail_next_step(self, exc: BaseException) -> None:
        """Fault injection: the next step() raises exc (and changes nothing)."""
        self._failure = exc

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise EngineError(f"echo: sequence {seq_id} exists")
        if len(self._seqs) >= self._max_num_sequence:
            raise EngineError("echo: too many sequences")
        self._seqs[seq_id] = _EchoSeq()

    def set_prompt_length(self, seq_id: int, num_prompt_tokens: int) -> None:
        self._seqs[seq_id].prompt_length = num_prompt_tokens

    def remove_sequence(self, seq_id: int) -> None:
        for page in self._seqs.pop(seq_id).pages:
            self._decref(page)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        parent = self._seqs[parent_id]
        pos = len(parent.tokens) if fork_pos < 0 else fork_pos
        if child_id in self._seqs or not 0 <= pos <= len(parent.tokens):
            raise EngineError(f"echo: bad fork {parent_id} -> {child_id} at {pos}")
        if len(self._seqs) >= self._max_num_sequence:
            raise EngineError("echo: too many sequences")
        full = parent.pages[: pos // self._page_size]
        for page in full:
            self._refcount[page] += 1
        child = _EchoSeq(list(parent.tokens[:pos]), list(full), parent.prompt_length)
        if pos % self._page_size:
            child.pages.append(self._alloc())
        self._seqs[child_id] = child

    def popn(self, seq_id: int, num_tokens: int) -> None:
        seq = self._seqs[seq_id]
        del seq.tokens[len(seq.tokens) - num_tokens :]
        keep = -(-len(seq.tokens) // self._page_size)
        for page in seq.pages[keep:]:
            self._decref(page)
        del seq.pages[keep:]

    def sequence_length(self, seq_id: int) -> int:
        return len(self._seqs[seq_id].tokens)

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        return self.score(batch, [1] * len(batch))

    def verify(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        """Logits at every new position: what `step` would return had the entry ended there."""
        return self.score(batch, [len(tokens) for _, tokens in batch])

    def score(
        self, batch: Sequence[tuple[int, Sequence[int]]], num_logits: Sequence[int]
    ) -> npt.NDArray[np.float32]:
        """Logits at the last num_logits[i] new positions of entry i (speculative decoding)."""
        self._append(batch)
        at: list[tuple[_EchoSeq, int]] = []
        for (seq_id, _), k in zip(batch, num_logits, strict=True):
            seq = self._seqs[seq_id]
            end = len(seq.tokens)
            at.extend((seq, length) for length in range(end - k + 1, end + 1))
        return self._rows(at)

    def _rows(self, at: Sequence[tuple[_EchoSeq, int]]) -> npt.NDArray[np.float32]:
        """The logits after the first `length` tokens of each (sequence, length)."""
        return self._logits([self._next_token(seq, length) for seq, length in at])

    def hidden(self, batch: Sequence[tuple[int, Sequence[int]]]) -> npt.NDArray[np.float32]:
        """Fake hidden states at every new position: `HIDDEN_SIZE` features of the token alone."""
        self._append(batch)
        ids = np.fromiter((t for _, tokens in batch for t in tokens), np.float64)
        return np.cos(np.outer(ids, np.arange(1, HIDDEN_SIZE + 1))).astype(np.float32)

    def _append(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        if self._failure is not None:
            exc, self._failure = self._failure, None
            raise exc
        if len({seq_id for seq_id, _ in batch}) != len(batch):
            raise EngineError("echo: a sequence appears twice in one batch")
        if self.launch_hook is not None:
            self.launch_hook()
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        self.num_steps += 1
        self.num_tokens_total += sum(len(tokens) for _, tokens in batch)
        for seq_id, new_tokens in batch:
            seq = self._seqs[seq_id]
            if not new_tokens:
                raise EngineError(f"echo: empty entry for sequence {seq_id}")
            if len(seq.tokens) + len(new_tokens) > self._context_window_size:
                raise EngineError(f"echo: sequence {seq_id} exceeds the context window")
            self._grow(seq, len(new_tokens))
            seq.tokens.extend(new_tokens)
            if seq.prompt_length is None:
                seq.prompt_length = len(seq.tokens)

    def _logits(self, next_ids: Sequence[int]) -> npt.NDArray[np.float32]:
        logits = np.full((len(next_ids), self._vocab_size), _MASKED_LOGIT, dtype=np.float32)
        if self._filler is not None:
            logits[:, self._filler] = _FILLER_LOGIT
        logits[np.arange(len(next_ids)), np.asarray(next_ids, dtype=np.int64)] = 0.0
        return logits

    def close(self) -> None:
        self.closed = True

    def _next_token(self, seq: _EchoSeq, length: int | None = None) -> int:
        """The token after the first `length` tokens of seq (default: all of them)."""
        assert seq.prompt_length is not None
        echoed = (len(seq.tokens) if length is None else length) - seq.prompt_length
        if 0 <= echoed < seq.prompt_length:
            return seq.tokens[echoed]
        return self._eos  # past the prompt (or inside a prefill chunk, whose logits are unused)

    def _grow(self, seq: _EchoSeq, num_tokens: int) -> None:
        length = len(seq.tokens)
        if length % self._page_size and self._refcount[seq.pages[-1]] > 1:
            old = seq.pages[-1]
            seq.pages[-1] = self._alloc()  # copy-on-write of a shared partial page
            self._decref(old)
        while len(seq.pages) * self._page_size < length + num_tokens:
            seq.pages.append(self._alloc())

    def _alloc(self) -> int:
        if not self._free:
            raise EngineError("echo: out of KV cache pages")
        page = self._free.pop()
        self._refcount[page] = 1
        return page

    def _decref(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._free.append(page)


def build_echo_core(
    delay_s: float = 0.0,
    total_pages: int = 512,
    max_num_sequence: int = 8,
    context_window_size: int = 2048,
    *,
    prefill_chunk_size: int = 512,
    prefix_cache_mode: PrefixCacheMode = "disable",
    prefix_cache_max_num_recycling_seqs: int = 16,
    speculator: Any = None,
    runner_class: type[EchoRunner] | None = None,
) -> tuple[EngineCore, ByteTokenizer, RawChatTemplate]:
    """An `EngineCore` over `EchoRunner` + `ByteTokenizer` (the `mock://echo` model).

    The prefix cache is off by default, so that an idle echo engine has every page free (the
    server tests rely on it); engine tests turn it on. `speculator` (runtime/speculative.py)
    drafts; `runner_class` swaps in a subclass of the fake (a different model of the tokens)."""
    tokenizer = ByteTokenizer()
    template = RawChatTemplate()
    runner = (runner_class or EchoRunner)(
        vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.eos_token_ids[0],
        filler_token_id=tokenizer.encode(FILLER)[0],
        total_pages=total_pages,
        max_num_sequence=max_num_sequence,
        context_window_size=context_window_size,
        delay_s=delay_s,
    )
    config = EngineConfig(
        model="mock://echo",
        max_num_sequence=max_num_sequence,
        prefill_chunk_size=prefill_chunk_size,
        context_window_size=context_window_size,
        kv_page_size=runner.page_size,
        prefix_cache_mode=prefix_cache_mode,
        prefix_cache_max_num_recycling_seqs=prefix_cache_max_num_recycling_seqs,
    )
    core = EngineCore(
        runner,
        tokenizer,
        config,
        extra_stop_token_ids=template.stop_token_ids,
        speculator=speculator,
    )
    return core, tokenizer, template
