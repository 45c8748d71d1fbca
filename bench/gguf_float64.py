"""A float64 numpy model of a llama-architecture GGUF file: which greedy token is right?

    python bench/gguf_float64.py FILE.gguf "The capital of France is"   # its top 5 next tokens

`Float64Model(path).logprobs(ids)` is the log-softmax of the logits at the last position of
`ids` (every position with `last_only=False`), computed by an implementation that shares no code
with mlctrio's compiled model or with llama.cpp. Its rules:

- Weights are the file's own tensors, dequantized by gguf-py (`gguf.quants.dequantize`) and
  widened to float64. Its float32 holds F32 / F16 values and Q8_0's d * q (f16 scale, int8)
  exactly, and Q4_1's d * q + m wherever that fits 24 bits (every weight of SmolLM2-135M's Q4_1
  file: the same as a float64 decode): the real numbers the file stores. Every activation,
  matmul, norm, RoPE angle, softmax and the head are float64: no int8 or f16 rounding of
  activations, no f16 KV cache.
- The llama graph as llama.cpp builds it for `general.architecture = llama`: RMSNorm (the file's
  epsilon), Q/K/V projections, RoPE, grouped-query causal attention scaled by 1 / sqrt(head_dim),
  o_proj, SwiGLU MLP (silu(gate) * up, down), final RMSNorm, `output.weight` or the tied
  `token_embd.weight` as the head.
- RoPE is ggml's NORM mode on the file's rows: adjacent pairs (2i, 2i+1) rotated by
  pos * freq_base^(-2i / head_dim). The converter permuted the Q/K rows of the checkpoint for
  exactly this layout, so no permutation is undone here.
- Anything else (rope scaling, a partial rotary dimension, biases, other architectures) raises
  NotImplementedError rather than being computed approximately.

The whole sequence is recomputed on every call (no KV cache): a forward of SmolLM2-135M over
~100 tokens takes about a second on 2 cores once the weights are loaded (~1 GB in float64).

bench/gguf_parity.py --float64 uses it (`float64_checks`, `report_float64`): at the first step
where mlctrio's and llama-server's greedy continuations differ, which of the two tokens float64
arithmetic prefers in the context both servers shared.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

F64 = np.ndarray


def log_softmax(z: F64) -> F64:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Float64Model:
    """A llama GGUF file in float64 (see the module docstring for the rules)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        self.meta = {k: f.contents() for k, f in reader.fields.items() if f.types}
        self.tensors = {t.name: t for t in reader.tensors}
        self._cache: dict[str, F64] = {}
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise NotImplementedError(f"architecture {arch!r}: only llama is modelled")
        k = "llama."
        self.n_layers = int(self.meta[k + "block_count"])
        self.n_head = int(self.meta[k + "attention.head_count"])
        self.n_kv = int(self.meta.get(k + "attention.head_count_kv", self.n_head))
        hidden = int(self.meta[k + "embedding_length"])
        self.head_dim = int(self.meta.get(k + "attention.key_length", hidden // self.n_head))
        self.eps = float(self.meta[k + "attention.layer_norm_rms_epsilon"])
        self.freq_base = float(self.meta.get(k + "rope.freq_base", 10000.0))
        rope_dims = int(self.meta.get(k + "rope.dimension_count", self.head_dim))
        scaling = self.meta.get(k + "rope.scaling.type", "none")
        if rope_dims != self.head_dim or scaling != "none" or "rope_freqs.weight" in self.tensors:
            raise NotImplementedError("rope scaling or a partial rotary dimension")
        if any(name.endswith(".bias") for name in self.tensors):
            raise NotImplementedError("biases")
        self.head = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"

    def weight(self, name: str) -> F64:
        """A tensor dequantized to float64, shape (rows, cols) as ggml's ne reversed."""
        if name not in self._cache:
            from gguf.quants import dequantize

            t = self.tensors[name]
            w = dequantize(t.data, t.tensor_type).astype(np.float64)
            self._cache[name] = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        return self._cache[name]

    def rms_norm(self, x: F64, name: str) -> F64:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.weight(name)

    def rope(self, x: F64) -> F64:
        """ggml NORM mode on x (n, heads, head_dim): pair (2i, 2i+1) turns by pos * theta_i."""
        d = x.shape[-1]
        theta = self.freq_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        angle = np.arange(x.shape[0], dtype=np.float64)[:, None] * theta[None]
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def attention(self, h: F64, b: str) -> F64:
        n, d = h.shape[0], self.head_dim
        q = self.rope((h @ self.weight(b + "attn_q.weight").T).reshape(n, self.n_head, d))
        k = self.rope((h @ self.weight(b + "attn_k.weight").T).reshape(n, self.n_kv, d))
        v = (h @ self.weight(b + "attn_v.weight").T).reshape(n, self.n_kv, d)
        group = self.n_head // self.n_kv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("nhd,thd->hnt", q, k) / np.sqrt(d)
        scores = np.where(np.triu(np.ones((n, n), bool), 1)[None], -np.inf, scores)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("hnt,thd->nhd", p, v).reshape(n, self.n_head * d)
        return out @ self.weight(b + "attn_output.weight").T

    def mlp(self, h: F64, b: str) -> F64:
        gate = h @ self.weight(b + "ffn_gate.weight").T
        up = h @ self.weight(b + "ffn_up.weight").T
        return (gate / (1.0 + np.exp(-gate)) * up) @ self.weight(b + "ffn_down.weight").T

    def logits(self, ids: Sequence[int], last_only: bool = True) -> F64:
        """Logits (vocab,) at the last position, or (len(ids), vocab) at every position."""
        x = self.weight("token_embd.weight")[np.asarray(ids, dtype=np.int64)]
        for i in range(self.n_layers):
            b = f"blk.{i}."
            x = x + self.attention(self.rms_norm(x, b + "attn_norm.weight"), b)
            x = x + self.mlp(self.rms_norm(x, b + "ffn_norm.weight"), b)
        if last_only:
            x = x[-1:]
        z = self.rms_norm(x, "output_norm.weight") @ self.weight(self.head).T
        return z[0] if last_only else z

    def logprobs(self, ids: Sequence[int], last_only: bool = True) -> F64:
        return log_softmax(self.logits(ids, last_only))


# -- bench/gguf_parity.py --float64 -------------------------------------------------------------


@dataclass(frozen=True)
class Float64Check:
    """float64's view of one first divergence (ids in the context llama-server generated)."""

    prompt: str
    step: int
    mlctrio: str  # the token texts each server chose
    llama: str
    float64_top: str  # float64's greedy choice (end-of-generation tokens excluded, as ignore_eos)
    gap: float  # float64 logprob(mlctrio's token) - logprob(llama.cpp's token)
    picks: str  # "mlctrio", "llama.cpp" or "neither"
    ambiguous: bool = False  # mlctrio's text belongs to several ids: the likeliest one is used
    text_step: int | None = None  # when the ids part before the texts (the texts' step, or
    # the continuation's length where the texts never part; see float64_checks)


def float64_checks(
    gguf: Path,
    greedy: Sequence[Any],
    contexts: Sequence[tuple[Sequence[int], Sequence[int]]],
    vocab: Sequence[str],
) -> list[Float64Check]:
    """For each GreedyCheck with a token-level divergence, float64's logprobs after the prompt
    ids and llama-server's ids before the step (`contexts`: (prompt ids, llama ids) per check).

    mlctrio's tokens are known by their text only, and the ids of a partial UTF-8 character share
    the text '\ufffd': two continuations can part while their texts agree. So float64 also
    follows llama-server's ids up to the step; where float64's choice is another id with the
    same text (mlctrio's text), the ids parted there first, and that step is the one judged."""
    from mlctrio.models.gguf_file import GGUFModel
    from mlctrio.runtime.gguf_tokenizer import tokenizer_from_gguf

    eog = list(tokenizer_from_gguf(GGUFModel.open(gguf).metadata).eos_token_ids)
    model: Float64Model | None = None
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(vocab):
        by_text.setdefault(text, []).append(i)
    out = []
    for c, (prompt_ids, llama_ids) in zip(greedy, contexts, strict=True):
        n = len(llama_ids)
        if c.step is None:  # the same texts: still check the ids, if any text is ambiguous
            if len(c.mlctrio) != n or all(len(by_text[t]) == 1 for t in c.llama):
                continue
        elif c.step >= min(len(c.mlctrio), n):
            continue  # only a length difference: no two tokens to compare
        end = n - 1 if c.step is None else c.step  # the last step float64 looks at
        model = model or Float64Model(gguf)
        lps = model.logprobs([*prompt_ids, *llama_ids[:end]], last_only=False)
        lps = lps[len(prompt_ids) - 1 :]  # row k: the logprobs of step k
        banned = lps.copy()
        banned[:, eog] = -np.inf  # ignore_eos, on both servers
        tops = [int(t) for t in banned.argmax(axis=1)]
        same_text = range(n if c.step is None else c.step)
        hidden = [k for k in same_text if tops[k] != llama_ids[k] and vocab[tops[k]] == c.llama[k]]
        if c.step is None and not hidden:
            continue
        step = hidden[0] if hidden else c.step
        lp, theirs, top = lps[step], llama_ids[step], tops[step]
        candidates = by_text.get(c.mlctrio[step], [])
        ours = max(candidates, key=lambda t: lp[t]) if candidates else None
        picks = "mlctrio" if top == ours else "llama.cpp" if top == theirs else "neither"
        gap = float("nan") if ours is None else float(lp[ours] - lp[theirs])
        out.append(
            Float64Check(
                c.prompt,
                step,
                c.mlctrio[step],
                c.llama[step],
                vocab[top],
                gap,
                picks,
                len(candidates) > 1,
                (n if c.step is None else c.step) if hidden else None,
            )
        )
    return out


def report_float64(checks: Sequence[Float64Check]) -> None:
    from bench._common import print_table

    n = {who: sum(c.picks == who for c in checks) for who in ("mlctrio", "llama.cpp", "neither")}
    print(
        f"\nfloat64 picks mlctrio's token at {n['mlctrio']} of {len(checks)} divergences "
        f"(llama.cpp's at {n['llama.cpp']}, neither at {n['neither']})\n(float64 gap: its "
        "logprob of mlctrio's token minus llama.cpp's, in the context both servers shared)\n"
    )
    rows: list[dict[str, object]] = [
        {
            "first diff": c.step if c.text_step is None else f"{c.step} (text {c.text_step})",
            "mlctrio / llama.cpp token": f"{c.mlctrio!r} / {c.llama!r}"
            + ("*" if c.ambiguous else ""),
            "float64 gap": f"{c.gap:+.4f}",
            "float64 top": repr(c.float64_top),
            "float64 picks": c.picks,
            "prompt": _short(c.prompt),
        }
        for c in checks
    ]
    print_table("float64", list(rows[0]) if rows else ["first diff"], rows)
    if any(c.ambiguous for c in checks):
        print("\n*: several ids have mlctrio's token text; the gap uses the likeliest of them")
    if any(c.text_step is not None for c in checks):
        print(
            "(text N): the texts part at step N (N = all tokens: never), llama-server's ids "
            "from float64's earlier, on a text several ids share (mlctrio's id is unknown)"
        )


def _short(text: str, width: int = 34) -> str:
    r = repr(text)
    return r if len(r) <= width else r[: width - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("prompt", help="text, tokenized by the file's tokenizer (mlctrio's)")
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    from mlctrio.models.gguf_file import GGUFModel
    from mlctrio.runtime.gguf_tokenizer import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(GGUFModel.open(args.gguf).metadata)
    ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    lp = Float64Model(args.gguf).logprobs(ids)
    for t in np.argsort(-lp)[: args.top]:
        print(f"{lp[t]:10.6f}  {int(t):6d}  {tokenizer.token_bytes(int(t))!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
