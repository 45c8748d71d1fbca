"""Same GGUF file, two servers: does mlctrio tokenize and generate like llama.cpp's llama-server?

    python bench/gguf_parity.py FILE.gguf
    python bench/gguf_parity.py FILE.gguf --type Q8_0            # llama-quantize FILE first
    python bench/gguf_parity.py FILE.gguf --activations q8       # mlctrio's int8 activations
    python bench/gguf_parity.py FILE.gguf --float64              # who is right at divergences

Both servers run on FILE at the same time (parity is not timed): `mlctrio serve FILE` and
`llama-server -m FILE` (bench/llama_cpp.py finds or builds it), `--threads` threads each.
`--mlctrio-args` / `--llama-args` add arguments: llama-server's KV cache is f16 by default,
`--llama-args "-ctk f32 -ctv f32"` makes it f32 like mlctrio's float activations.

(a) Tokenization: every text of TOKENIZE_TEXTS (code, unicode, CJK, emoji, whitespace runs,
    newlines, digits, special-token strings) goes to both /tokenize routes, without BOS/EOS and
    with special-token strings parsed (mlctrio: `add_special_tokens: false`, which still matches
    special tokens in the text, as HF tokenizers do; llama-server: `add_special: false,
    parse_special: true`). The ids must be identical; a mismatch is the only thing that makes the
    script exit non-zero.

(b) Greedy parity: each of GREEDY_PROMPTS is tokenized once (by llama-server; (a) says both agree)
    and the same ids go to both servers: temperature 0, `ignore_eos`, `--tokens` tokens, the top
    `--top` log-probabilities per step (mlctrio's /v1/completions `logprobs`, llama-server's
    /completion `n_probs`, both before sampling). The continuations are compared token by token.
    mlctrio's legacy logprobs name tokens by their text, so ids are compared as the text mlctrio
    gives each id (token bytes decoded as UTF-8 with replacement; vocabulary from the file). At the
    first differing step, the report gives both choices and, in each server's own logprobs, the
    gap between its choice and the other server's (absent: not in that server's top list). A
    divergence is a "near-tie" when both gaps are below `--tie-nats` (a different rounding of the
    same numbers picks the other of two almost equal logits), else "differs". Everything after the
    first differing step is a different continuation and is not compared. Divergences are
    reported, never fatal: quantized arithmetic legitimately differs between implementations.
    `max dlogp` (max_logprob_diff) measures how far apart the two computations are even where the
    chosen tokens agree: the largest spread, within one step, of the differences between the two
    servers' logprobs of the tokens in both top lists, over the steps that saw the same context.

(c) With `--float64`, after both servers stop: at each first differing step, bench/gguf_float64.py's
    float64 numpy model of FILE computes the log-probabilities after the shared context (the
    prompt ids and llama-server's ids before the step) and says which server's token it prefers
    (or neither), with its logprob gap between the two; a summary line counts the picks.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import llama_cpp, llama_server
from bench._common import mlctrio_serve_cmd, print_table

TOKENIZE_TEXTS = (
    "Hello, world!",
    " leading space and trailing space ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // C',
    "naïve café, Ünïcödé — “quotes” … ½ ∑ ∫ ≠ ≤ ß ø",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Привет, мир! مرحبا بالعالم שלום עולם",
    "emoji 🙂👍🏽🇫🇷 👨‍👩‍👧‍👦 ❤️ 🤖",
    "a    b\t\t\tc   \n\n\n   d      ",
    "\n\nline1\r\nline2\n\n\n\n",
    "3.14159265358979 1234567890 0x1F 1e-10 2024-01-31 12:34:56 1,000,000",
    "I'm sure they'll say it's what we've done, can't they?",
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "CamelCaseIdentifier snake_case_var SCREAMING_CONST",
    "!!!???...,,,;;; ((( ))) [[ ]] {{ }} <<< >>>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|im_end|><|im_start|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n",
)

_CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GREEDY_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def quicksort(arr):\n",
    "1, 2, 3, 5, 8, 13,",
    "The quick brown fox",
    "Water boils at",
    "import numpy as np\n\nx = np.",
    "Le chat est sur",
    "In 1969, humans first",
    "日本の首都は",
    "My favourite emoji is 🙂 because",
    "Q: What is 12 * 12?\nA:",
    _CHAT.format("What is the capital of Germany?"),
    _CHAT.format("Write a haiku about the sea."),
    _CHAT.format("List three colors."),
    _CHAT.format("Explain gravity in one sentence."),
)


# -- pure helpers (tested without servers) ------------------------------------------------------


@dataclass(frozen=True)
class TokenizeCheck:
    text: str
    mlctrio: list[int]
    llama: list[int]

    @property
    def ok(self) -> bool:
        return self.mlctrio == self.llama

    @property
    def first_difference(self) -> int | None:
        if self.ok:
            return None
        pairs = enumerate(zip(self.mlctrio, self.llama, strict=False))
        shorter = min(len(self.mlctrio), len(self.llama))
        return next((i for i, (a, b) in pairs if a != b), shorter)


@dataclass(frozen=True)
class GreedyCheck:
    """One prompt's continuations, both as texts of tokens, and the first divergence if any."""

    prompt: str
    prompt_tokens: int
    mlctrio: list[str]
    llama: list[str]
    step: int | None = None  # first differing step
    mlctrio_gap: float | None = None  # mlctrio: logprob(its choice) - logprob(llama's choice)
    llama_gap: float | None = None  # llama.cpp: logprob(its choice) - logprob(mlctrio's choice)
    verdict: str = "identical"  # identical, near-tie, differs
    max_diff: float | None = None  # max |logprob difference| of the tokens both top lists share


def divergence(
    ours: Sequence[str],
    our_tops: Sequence[Mapping[str, float]],
    theirs: Sequence[str],
    their_tops: Sequence[Mapping[str, float]],
    tie_nats: float,
) -> tuple[int | None, float | None, float | None, str]:
    """(first differing step, mlctrio's gap, llama.cpp's gap, verdict) of two continuations.

    A gap is a server's logprob of its own choice minus its logprob of the other's choice (>= 0
    for a greedy choice); None when the other's choice is not in that server's top list. A length
    difference counts as a divergence at the shorter length, with no gaps ("differs")."""
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if step is None:
        if len(ours) == len(theirs):
            return None, None, None, "identical"
        return min(len(ours), len(theirs)), None, None, "differs"
    a, b = ours[step], theirs[step]
    mine = our_tops[step] if step < len(our_tops) else {}
    other = their_tops[step] if step < len(their_tops) else {}
    our_gap = mine[a] - mine[b] if a in mine and b in mine else None
    their_gap = other[b] - other[a] if a in other and b in other else None
    tie = our_gap is not None and their_gap is not None and max(our_gap, their_gap) < tie_nats
    return step, our_gap, their_gap, "near-tie" if tie else "differs"


def check_tokenization(
    texts: Sequence[str], ours: Callable[[str], list[int]], theirs: Callable[[str], list[int]]
) -> list[TokenizeCheck]:
    """Part (a): each text through mlctrio's tokenizer (`ours`) and llama.cpp's (`theirs`)."""
    return [TokenizeCheck(t, list(ours(t)), list(theirs(t))) for t in texts]


def max_logprob_diff(
    our_tops: Sequence[Mapping[str, float]],
    their_tops: Sequence[Mapping[str, float]],
    steps: int,
) -> float | None:
    """How far apart the two servers' log-probabilities are, over the first `steps` steps (those
    where both saw the same context): per step, the spread (max - min) of mlctrio's minus
    llama.cpp's logprob over the tokens in both top lists; the largest spread.

    A spread, not the differences themselves: the two logprobs of a step may be normalised over
    different sets (mlctrio's `ignore_eos` bans end-of-generation tokens before its logprobs,
    llama-server's `n_probs` are the model's softmax with them), which shifts every logprob of
    the step by the same constant. None when no step shares two tokens."""
    spreads = []
    for ours, theirs in zip(our_tops[:steps], their_tops[:steps], strict=False):
        shared = [t for t in ours.keys() & theirs.keys() if "\ufffd" not in t]  # ambiguous text
        if len(shared) >= 2:
            diffs = [ours[t] - theirs[t] for t in shared]
            spreads.append(max(diffs) - min(diffs))
    return max(spreads) if spreads else None


def token_texts(token_bytes: Callable[[int], bytes], vocab_size: int) -> list[str]:
    """The text mlctrio's logprobs give each token id (its bytes, UTF-8 with replacement)."""
    return [token_bytes(i).decode("utf-8", "replace") for i in range(vocab_size)]


def greedy_rows(checks: Sequence[GreedyCheck]) -> list[dict[str, object]]:
    """print_table rows for the greedy comparison."""
    rows: list[dict[str, object]] = []
    for c in checks:
        at = "-" if c.step is None else str(c.step)
        pair = "-"
        if c.step is not None:
            m = c.mlctrio[c.step] if c.step < len(c.mlctrio) else "<end>"
            lc = c.llama[c.step] if c.step < len(c.llama) else "<end>"
            pair = f"{m!r} / {lc!r}"
        rows.append(
            {
                "prompt tok": c.prompt_tokens,
                "result": c.verdict,
                "first diff": at,
                "mlctrio / llama.cpp token": pair,
                "mlctrio gap": "-" if c.step is None else _gap(c.mlctrio_gap),
                "llama.cpp gap": "-" if c.step is None else _gap(c.llama_gap),
                "max dlogp": "-" if c.max_diff is None else f"{c.max_diff:.4f}",
                "prompt": _short(c.prompt),
            }
        )
    return rows


def _pair(c: GreedyCheck) -> tuple[str, ...]:
    assert c.step is not None
    return tuple(side[c.step] for side in (c.mlctrio, c.llama) if c.step < len(side))


def _gap(gap: float | None) -> str:
    return "absent" if gap is None else f"{gap:.4f}"


def _short(text: str, width: int = 34) -> str:
    r = repr(text)
    return r if len(r) <= width else r[: width - 3] + "..."


# -- talking to the servers ---------------------------------------------------------------------


def mlctrio_tokenize(url: str, model: str, text: str) -> list[int]:
    body = {"model": model, "prompt": text, "add_special_tokens": False}
    response = httpx.post(url + "/tokenize", json=body, timeout=30)
    response.raise_for_status()
    return [int(t) for t in response.json()["tokens"]]


def mlctrio_greedy(
    url: str, model: str, ids: Sequence[int], n: int, top: int
) -> tuple[list[str], list[dict[str, float]]]:
    """mlctrio's greedy continuation (token texts) and each step's top logprobs by token text."""
    body = {
        "model": model,
        "prompt": list(ids),
        "max_tokens": n,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": top,
    }
    response = httpx.post(url + "/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    lp = response.json()["choices"][0]["logprobs"]
    return list(lp["tokens"]), [dict(t or {}) for t in lp["top_logprobs"]]


def _first_model(url: str) -> str:
    return str(httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"])


@contextmanager
def open_mlctrio(gguf: Path, threads: int, extra: Sequence[str]) -> Iterator[str]:
    port = llama_server.free_port()
    cmd = mlctrio_serve_cmd(gguf, port, extra)
    env = {"TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    server = llama_server.start_server("mlctrio", cmd, port, env=env, startup_timeout_s=1800)
    try:
        yield server.url
    finally:
        server.stop()


def run_parity(args: argparse.Namespace, gguf: Path) -> dict[str, Any]:
    vocab = _vocab_texts(gguf)
    with ExitStack() as stack:
        t0 = time.monotonic()
        llama = stack.enter_context(
            llama_server.open_llama_server(
                gguf, threads=args.threads, ctx_per_slot=1024, extra=shlex.split(args.llama_args)
            )
        ).url
        ours = stack.enter_context(open_mlctrio(gguf, args.threads, args.mlctrio_extra))
        model = _first_model(ours)
        print(f"both servers up in {time.monotonic() - t0:.0f} s", flush=True)
        tok = check_tokenization(
            TOKENIZE_TEXTS,
            lambda t: mlctrio_tokenize(ours, model, t),
            lambda t: llama_server.tokenize(llama, t),
        )
        greedy, contexts = [], []
        for prompt in GREEDY_PROMPTS:
            ids = llama_server.tokenize(llama, prompt)
            our_toks, our_tops = mlctrio_greedy(ours, model, ids, args.tokens, args.top)
            res = llama_server.greedy_tokens(llama, ids, args.tokens, n_probs=args.top)
            their_toks = [vocab[t] for t in res.tokens]
            contexts.append((ids, res.tokens))
            their_tops = [{vocab[i]: lp for i, lp in step} for step in res.top_logprobs]
            step, mg, lg, verdict = divergence(
                our_toks, our_tops, their_toks, their_tops, args.tie_nats
            )
            same_context = len(our_toks) if step is None else step + 1
            diff = max_logprob_diff(our_tops, their_tops, same_context)
            greedy.append(
                GreedyCheck(prompt, len(ids), our_toks, their_toks, step, mg, lg, verdict, diff)
            )
    result: dict[str, Any] = {"tokenize": tok, "greedy": greedy}
    if args.float64:  # the servers are stopped: the cores are free
        from bench.gguf_float64 import float64_checks

        result["float64"] = float64_checks(gguf, greedy, contexts, vocab)
    return result


def _vocab_texts(gguf: Path) -> list[str]:
    from mlctrio.models.gguf_file import GGUFModel
    from mlctrio.runtime.gguf_tokenizer import tokenizer_from_gguf

    meta = GGUFModel.open(gguf).metadata
    tokenizer = tokenizer_from_gguf(meta)
    return token_texts(tokenizer.token_bytes, len(meta["tokenizer.ggml.tokens"]))


def report(result: dict[str, Any], title: str) -> int:
    """Print both tables; 1 when any tokenization differs, else 0."""
    tok: list[TokenizeCheck] = result["tokenize"]
    greedy: list[GreedyCheck] = result["greedy"]
    print(f"\n{title}")
    n_ok = sum(c.ok for c in tok)
    print(f"\ntokenization: {n_ok}/{len(tok)} texts give identical ids\n")
    rows: list[dict[str, object]] = [
        {
            "ids": len(c.llama),
            "result": "same" if c.ok else f"DIFFERS at {c.first_difference}",
            "text": _short(c.text, 60),
        }
        for c in tok
    ]
    print_table("tokenize", ["ids", "result", "text"], rows)
    for c in tok:
        if not c.ok:
            print(f"  {c.text!r}\n    mlctrio   {c.mlctrio}\n    llama.cpp {c.llama}")
    counts = {v: sum(c.verdict == v for c in greedy) for v in ("identical", "near-tie", "differs")}
    diffs = [c.max_diff for c in greedy if c.max_diff is not None]
    print(
        f"\ngreedy: {counts['identical']}/{len(greedy)} identical, {counts['near-tie']} near-tie, "
        f"{counts['differs']} differ; max dlogp over all prompts "
        f"{max(diffs, default=float('nan')):.4f}\n(gap: logprob of the server's own choice minus "
        "the other's; max dlogp: the largest spread of logprob differences mlctrio - llama.cpp "
        "within a step, over the steps up to the first difference)\n"
    )
    cols = [
        "prompt tok",
        "result",
        "first diff",
        "mlctrio / llama.cpp token",
        "mlctrio gap",
        "llama.cpp gap",
        "max dlogp",
        "prompt",
    ]
    print_table("greedy", cols, greedy_rows(greedy))
    if any("\ufffd" in t for c in greedy if c.step is not None for t in _pair(c)):
        print(
            "\n\ufffd: a token that is part of a UTF-8 character; several ids share this text, "
            "so its gaps may compare different ids"
        )
    if "float64" in result:
        from bench.gguf_float64 import report_float64

        report_float64(result["float64"])
    return 0 if n_ok == len(tok) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("gguf", type=Path, help="a GGUF file both servers load")
    p.add_argument("--type", dest="gguf_type", help="llama-quantize the file to TYPE first")
    p.add_argument("--activations", help="mlctrio serve --activations (e.g. q8)")
    p.add_argument("--mlctrio-args", default="", help="more `mlctrio serve` arguments (shell)")
    p.add_argument(
        "--llama-args", default="", help='more llama-server arguments, e.g. "-ctk f32 -ctv f32"'
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--top", type=int, default=5, help="top logprobs per step (mlctrio: <= 5)")
    p.add_argument("--tie-nats", type=float, default=0.05, help="near-tie threshold, nats")
    p.add_argument(
        "--float64", action="store_true", help="float64's choice at each divergence (see (c))"
    )
    p.add_argument("--json-out", type=Path, help="write the results as JSON")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.mlctrio_extra = [
        *(["--activations", args.activations] if args.activations else []),
        *shlex.split(args.mlctrio_args),
    ]
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop both servers on a CI timeout
    gguf = args.gguf
    if args.gguf_type:
        gguf = llama_cpp.cached_quantized_gguf(gguf, args.gguf_type)
    extra = " ".join(args.mlctrio_extra) or "default activations"
    title = (
        f"{gguf.name}: mlctrio ({extra}) vs llama-server ({args.llama_args or 'defaults'}), "
        f"{args.tokens} greedy tokens"
    )
    result = run_parity(args, gguf)
    rc = report(result, title)
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"title": title, **{k: [asdict(c) for c in v] for k, v in result.items()}},
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
