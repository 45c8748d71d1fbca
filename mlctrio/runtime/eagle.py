"""`--speculative-mode eagle`: one decoder layer over [next token's embedding, feature] drafts
token by token (EAGLE, Li et al. 2024).

At position j the draft layer reads z_j = fc([embed(x_{j+1}), h_j]) where h_j is the target's
final hidden state at j, attends (causally, RoPE) over the z of earlier positions, and outputs
f_j, its guess of h_{j+1}; the target's LM head over f_j guesses x_{j+2}. Drafting continues
with [embed(guess), f_j] in place of the target's feature.

Rules:

* Per drafting choice, the layer's K/V of confirmed positions (target features, kept tokens)
  are kept between steps and extended with what the target computed since (the runner's
  hidden tap, runtime/hidden_tap.py); drafted positions' K/V are dropped after each draft.
* The layer sees at most `window` earlier positions (what the tap keeps): a longer context only
  costs acceptance. Positions the target never computed (a prefix-cache hit) are not seen.
* Greedy drafts over the draft vocabulary (runtime/draft_head.py), as exact verification needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ..engine.request import Branch
from .draft_head import F32, DraftHead, rms_norm, silu
from .hidden_tap import HiddenTap

_P = "layers.0."


@attrs.frozen
class EagleLayer:
    fc_w: F32  # (hidden, 2 * hidden): input [embedding, feature]
    fc_b: F32
    wq: F32
    wk: F32
    wv: F32
    wo: F32
    gate: F32
    up: F32
    down: F32
    post_norm: F32
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    eps: float
    head: DraftHead

    @classmethod
    def from_tensors(cls, t: dict[str, Any], config: dict[str, Any], head: DraftHead) -> EagleLayer:
        a = _P + "self_attn."
        return cls(
            t["fc.weight"], t["fc.bias"], t[a + "q_proj.weight"], t[a + "k_proj.weight"],
            t[a + "v_proj.weight"], t[a + "o_proj.weight"], t[_P + "mlp.gate_proj.weight"],
            t[_P + "mlp.up_proj.weight"], t[_P + "mlp.down_proj.weight"],
            t[_P + "post_attention_layernorm.weight"], int(config["num_attention_heads"]),
            int(config["num_key_value_heads"]), int(config["head_dim"]),
            float(config["rope_theta"]), float(config["rms_norm_eps"]), head,
        )  # fmt: skip

    def inputs(self, embeds: F32, features: F32) -> F32:
        """z = fc([embeds, features]) for rows (T, hidden) each."""
        return np.concatenate([embeds, features], axis=-1) @ self.fc_w.T + self.fc_b

    def forward(self, z: F32, pos: np.ndarray, past_k: F32, past_v: F32) -> tuple[F32, F32, F32]:
        """(f, k, v) for rows z (T, hidden) at positions pos, after keys past_k/past_v (P, kvh, d):
        row t sees the past and rows <= t."""
        t, d = len(z), self.head_dim
        q = self._rope((z @ self.wq.T).reshape(t, self.num_heads, d), pos)
        k = self._rope((z @ self.wk.T).reshape(t, self.num_kv_heads, d), pos)
        v = (z @ self.wv.T).reshape(t, self.num_kv_heads, d)
        keys, values = np.concatenate([past_k, k]), np.concatenate([past_v, v])
        group = self.num_heads // self.num_kv_heads
        kk = np.repeat(keys, group, axis=1).transpose(1, 2, 0)  # (heads, d, P + T)
        vv = np.repeat(values, group, axis=1).transpose(1, 0, 2)  # (heads, P + T, d)
        scores = np.matmul(q.transpose(1, 0, 2), kk) * np.float32(d**-0.5)  # (heads, T, P + T)
        p = len(past_k)
        mask = np.arange(p + t)[None, :] > (p + np.arange(t))[:, None]
        scores = np.where(mask[None], -np.inf, scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attn = np.matmul(scores, vv).transpose(1, 0, 2).reshape(t, -1) @ self.wo.T
        x = z + attn
        y = rms_norm(x, self.post_norm, self.eps)
        x = x + (silu(y @ self.gate.T) * (y @ self.up.T)) @ self.down.T
        return x.astype(np.float32), k, v

    def _rope(self, x: F32, pos: np.ndarray) -> F32:
        d = self.head_dim
        inv = self.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = pos[:, None].astype(np.float64) * inv[None]
        cos = np.concatenate([np.cos(ang)] * 2, axis=-1).astype(np.float32)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, axis=-1).astype(np.float32)[:, None, :]
        half = d // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        out: F32 = (x * cos + rotated * sin).astype(np.float32, copy=False)
        return out


@attrs.define
class _State:
    """The draft layer's K/V for one branch's confirmed positions [start, done)."""

    branch: Branch
    seq_id: int
    k: F32  # (done - start, kv heads, head dim), RoPE applied
    v: F32
    start: int = 0
    done: int = 0


class EagleProposer:
    """The Proposer (runtime/speculative.py) of `--speculative-mode eagle`."""

    def __init__(self, layer: EagleLayer, tap: HiddenTap, embed: Any, window: int) -> None:
        self.layer = layer
        self.tap = tap
        self._embed = embed  # token ids -> (n, hidden) input embeddings (the target's)
        self.window = window
        self._states: dict[int, _State] = {}

    def propose(self, branches: Sequence[Branch], want: Sequence[int]) -> list[list[int]]:
        live = {id(b) for b in branches}
        for key in [k for k in self._states if k not in live]:
            del self._states[key]
        out: list[list[int]] = [[] for _ in branches]
        for i, (b, k) in enumerate(zip(branches, want, strict=True)):
            if k > 0 and b.seq_id is not None:
                out[i] = self._draft(b, b.seq_id, k)
        return out

    def _draft(self, b: Branch, seq_id: int, want: int) -> list[int]:
        synced = self._sync(b, seq_id)
        if synced is None:
            return []
        state, f, token = synced
        drafts = [token]
        kv = (state.k, state.v)
        pos = b.num_tokens - 1
        for _ in range(1, want):
            z = self.layer.inputs(self._embed([token]), f[None])
            f_row, k, v = self.layer.forward(z, np.array([pos]), *kv)
            kv = (np.concatenate([kv[0], k]), np.concatenate([kv[1], v]))
            f = f_row[0]
            token = int(self.layer.head.argmax(f))
            drafts.append(token)
            pos += 1
        return drafts

    def _sync(self, b: Branch, seq_id: int) -> tuple[_State, F32, int] | None:
        """Bring the branch's K/V up to its last cached position (= num_tokens - 2); returns
        the state, the layer's output there and the first draft token it gives."""
        last = b.num_tokens - 2
        lo, hi = self.tap.span(seq_id)
        if hi <= last:
            return None  # the target's state at the last position is not held
        state = self._states.get(id(b))
        if (
            state is None
            or state.branch is not b
            or state.seq_id != seq_id
            or not (lo <= state.done <= last)
        ):
            # new, or the branch moved back (preempted, recomputed), or the tap lost what
            # follows what the state holds: start anew from what the tap holds
            empty = np.zeros((0, self.layer.num_kv_heads, self.layer.head_dim), np.float32)
            first = max(lo, last + 1 - self.window)
            state = self._states[id(b)] = _State(b, seq_id, empty, empty.copy(), first, first)
        feats = self.tap.rows(seq_id, state.done, last + 1)
        if feats is None:
            return None
        nxt = b.token_slice(state.done + 1, last + 2)  # the token after each position
        z = self.layer.inputs(self._embed(nxt), feats)
        pos = np.arange(state.done, last + 1)
        f, k, v = self.layer.forward(z, pos, state.k, state.v)
        state.k, state.v = np.concatenate([state.k, k]), np.concatenate([state.v, v])
        state.done = last + 1
        if state.done - state.start > self.window:
            cut = state.done - state.start - self.window
            state.k, state.v, state.start = state.k[cut:], state.v[cut:], state.start + cut
        return state, f[-1], int(self.layer.head.argmax(f[-1]))
