"""Issue 16 item 3: what a 7 MiB prompt costs, in process, on the default model's tokenizer.

    .venv/bin/python bench/big_prompt.py [--mib 7] [--old]

Prints, for the chat path with the context window passed (the cheap bound) and for /tokenize's
path (all of it, in pieces): seconds, the longest gap a 1 ms ticker thread saw (how long other
threads - the event loop, the engine - were held off), and RSS before, after and after trim.
`--old` also times one whole `tokenizers` encode (holds the GIL throughout).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


def timed(name: str, fn: Callable[[], Any]) -> None:
    gaps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    before = rss_mb()
    thread.start()
    start = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except Exception as exc:  # the 400 we expect for the chat path
        outcome = type(exc).__name__
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    print(
        f"{name}: {elapsed:.2f} s ({outcome}), longest ticker gap {max(gaps, default=0):.3f} s, "
        f"RSS {before} -> {rss_mb()} MB"
    )


def main() -> None:
    import gguf

    from mlctrio.models.fetch import DEFAULT_EMBEDDED, ensure_embedded
    from mlctrio.protocol.openai import parse_chat_request
    from mlctrio.runtime.gguf_tokenizer import chat_template_from_gguf, tokenizer_from_gguf
    from mlctrio.server import long_text, prompts

    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=float, default=7.0)
    parser.add_argument("--old", action="store_true")
    args = parser.parse_args()
    reader = gguf.GGUFReader(ensure_embedded(DEFAULT_EMBEDDED))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    tok = tokenizer_from_gguf(meta)
    template = chat_template_from_gguf(meta, tok)
    print(f"max_token_bytes {tok.max_token_bytes}")
    line = "The quick brown fox jumps over the lazy dog; Paris is the capital of France.\n"
    text = (line * int(args.mib * 2**20 / len(line) + 1))[: int(args.mib * 2**20)]
    req = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": text}]})
    timed(
        "chat, context_window=8192",
        lambda: prompts.render_chat(req.messages, None, template, tok, context_window=8192),
    )
    under = text[:600_000]  # under the cheap bound, over the window: counting stops early
    timed("600 kB under the bound", lambda: long_text.encode_text(under, tok, stop_at=8192))
    timed("tokenize all, in pieces", lambda: long_text.encode_text(text, tok))
    if args.old:
        timed("old: one tokenizers encode", lambda: tok.backend.tok.encode(text).ids)
        before = rss_mb()
        long_text.release_memory()
        print(f"malloc_trim: RSS {before} -> {rss_mb()} MB")


if __name__ == "__main__":
    main()
