"""Train Medusa heads and an EAGLE draft layer on a features file (features.py), with torch.

    python scripts/spec_heads/train.py FEATURES.npz OUT_DIR --name SmolLM2-135M-Instruct
        [--medusa-heads 4] [--minutes-medusa 4] [--minutes-eagle 15] [--threads 2]

Writes OUT_DIR/<name>-medusa and OUT_DIR/<name>-eagle, heads directories as
mlctrio/runtime/spec_heads.py reads them. Both share the target's frozen LM head, restricted
to the draft vocabulary of the features file. The math mirrors runtime/medusa.py and
runtime/eagle.py exactly (EAGLE: no norm before attention, rotate-half RoPE, SwiGLU MLP after
a post-attention RMSNorm; loss = SmoothL1 on the next feature + 0.1 x cross-entropy on the token
after it, features jittered by uniform noise as in EAGLE). Training is time-boxed, with a
held-out tenth of the sequences for the accuracies it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[2]))


class Medusa(nn.Module):
    def __init__(self, hidden: int, k: int) -> None:
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(k))
        for m in self.lin:  # zero: each head starts as the target's own head
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, k, H)
        return torch.stack([h + F.silu(m(h)) for m in self.lin], dim=1)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None].double() * inv
    cos = torch.cat([ang.cos()] * 2, -1).float()[..., None, :]
    sin = torch.cat([ang.sin()] * 2, -1).float()[..., None, :]
    half = d // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Eagle(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.c = c
        self.fc = nn.Linear(2 * h, h)
        self.q = nn.Linear(h, c["num_attention_heads"] * c["head_dim"], bias=False)
        self.k = nn.Linear(h, c["num_key_value_heads"] * c["head_dim"], bias=False)
        self.v = nn.Linear(h, c["num_key_value_heads"] * c["head_dim"], bias=False)
        self.o = nn.Linear(c["num_attention_heads"] * c["head_dim"], h, bias=False)
        self.gate = nn.Linear(h, i, bias=False)
        self.up = nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)
        self.norm = nn.Parameter(torch.ones(h))

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        z = self.fc(torch.cat([emb, feat], -1))
        q, k, v = self._qkv(z)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._out(z, a)

    def second_step(self, emb: torch.Tensor, feat: torch.Tensor, guess: torch.Tensor):
        """The layer's second draft step at every position j at once: its input there is its own
        guess of h_j (`guess`, its output at j - 1) instead of the target's, and it attends the
        target's positions before j plus itself, as at inference (EAGLE-3's training-time test,
        one step deep)."""
        d = self.c["head_dim"]
        z = self.fc(torch.cat([emb, feat], -1))
        z2 = self.fc(torch.cat([emb, guess], -1))
        _, k, v = self._qkv(z)
        q2, k2, v2 = self._qkv(z2)
        t = z.shape[1]
        scores = (q2 @ k.transpose(-1, -2)) * d**-0.5  # (b, heads, t, t)
        before = torch.ones(t, t, dtype=torch.bool).tril(-1)
        scores = scores.masked_fill(~before, float("-inf"))
        own = (q2 * k2).sum(-1, keepdim=True) * d**-0.5  # (b, heads, t, 1)
        p = torch.softmax(torch.cat([scores, own], -1), -1)
        a = p[..., :t] @ v + p[..., t:] * v2
        return self._out(z2, a)

    def _qkv(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.c
        b, t, _ = z.shape
        pos = torch.arange(t)
        nh, kvh, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        q = rope(self.q(z).view(b, t, nh, d), pos, c["rope_theta"]).transpose(1, 2)
        k = rope(self.k(z).view(b, t, kvh, d), pos, c["rope_theta"]).transpose(1, 2)
        v = self.v(z).view(b, t, kvh, d).transpose(1, 2)
        return q, k.repeat_interleave(nh // kvh, dim=1), v.repeat_interleave(nh // kvh, dim=1)

    def _out(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = a.shape
        x = z + self.o(a.transpose(1, 2).reshape(b, t, -1))
        c = self.c
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * self.norm
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def load(path: Path) -> dict:
    f = np.load(path)
    return {k: f[k] for k in f.files}


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(0).permutation(n)
    held = max(1, n // 10)
    return idx[held:], idx[:held]


def train_medusa(d: dict, head: torch.Tensor, vmap: np.ndarray, k: int, minutes: float) -> dict:
    tokens, offsets, plens, hidden = d["tokens"], d["offsets"], d["prompt_lens"], d["hidden"]
    train_ids, held_ids = split(len(offsets) - 1)

    def rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for s in ids:
            a, e, p = offsets[s], offsets[s + 1], plens[s]
            for t in range(a + p - 1, e - 2):  # h_t; head i predicts x_{t+2+i}
                xs.append(t)
                ys.append([vmap[tokens[t + 2 + i]] if t + 2 + i < e else -1 for i in range(k)])
        return np.array(xs), np.array(ys)

    xt, yt = rows(train_ids)
    xh, yh = rows(held_ids)
    model = Medusa(hidden.shape[1], k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    end = time.time() + minutes * 60
    step, rng = 0, np.random.default_rng(1)
    while time.time() < end:
        pick = rng.integers(0, len(xt), 256)
        h = torch.from_numpy(hidden[xt[pick]].astype(np.float32))
        y = torch.from_numpy(yt[pick])
        logits = model(h) @ head.T
        loss = F.cross_entropy(logits.reshape(-1, head.shape[0]), y.reshape(-1), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"medusa step {step} loss {loss.item():.3f}", flush=True)
    with torch.no_grad():
        h = torch.from_numpy(hidden[xh].astype(np.float32))
        pred = (model(h) @ head.T).argmax(-1).numpy()
    acc = [float(((pred[:, i] == yh[:, i]) & (yh[:, i] >= 0)).sum() / (yh[:, i] >= 0).sum())
           for i in range(k)]  # fmt: skip
    print(f"medusa: {step} steps, held-out top-1 accuracy per head {np.round(acc, 3)}")
    out = {}
    for i, m in enumerate(model.lin):
        out[f"medusa_head.{i}.0.linear.weight"] = m.weight.detach().numpy()
        out[f"medusa_head.{i}.0.linear.bias"] = m.bias.detach().numpy()
    return {"tensors": out, "accuracy": acc, "steps": step}


def eagle_batches(d: dict, ids: np.ndarray, rng: np.random.Generator, batch: int):
    order = rng.permutation(ids)
    for i in range(0, len(order), batch):
        yield order[i : i + batch]


def eagle_tensors(d: dict, seqs: np.ndarray, vmap: np.ndarray, noise: float):
    names = ("tokens", "offsets", "prompt_lens", "hidden", "embed")
    tokens, offsets, plens, hidden, embed = (d[k] for k in names)
    t = max(offsets[s + 1] - offsets[s] for s in seqs) - 1
    b, h = len(seqs), hidden.shape[1]
    emb = np.zeros((b, t, h), np.float32)
    feat = np.zeros((b, t, h), np.float32)
    tgt_f = np.zeros((b, t, h), np.float32)
    tgt_y = np.full((b, t), -1, np.int64)
    wmask = np.zeros((b, t), np.float32)
    for r, s in enumerate(seqs):
        a, e, p = offsets[s], offsets[s + 1], plens[s]
        n = e - a - 1  # positions j = 0..n-1 have x_{j+1}
        emb[r, :n] = embed[tokens[a + 1 : e]]
        feat[r, :n] = hidden[a : e - 1]
        tgt_f[r, : n - 1] = hidden[a + 1 : e - 1]
        ys = vmap[tokens[a + 2 : e]]
        tgt_y[r, : n - 1] = ys
        wmask[r, max(0, p - 2) : n - 1] = 1.0  # predict answer tokens (x_{j+2}, j+2 >= p)
    feat_t = torch.from_numpy(feat)
    if noise:
        feat_t = feat_t + (torch.rand_like(feat_t) - 0.5) * noise
    return (torch.from_numpy(emb), feat_t, torch.from_numpy(tgt_f), torch.from_numpy(tgt_y),
            torch.from_numpy(wmask))  # fmt: skip


# torch parameter name -> the EAGLE checkpoint's tensor name (runtime/spec_heads.py)
EAGLE_NAMES = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    "norm": "layers.0.post_attention_layernorm.weight",
    **{f"{n}.weight": f"layers.0.self_attn.{n}_proj.weight" for n in "qkvo"},
    **{f"{n}.weight": f"layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
}


def eagle_loss(model: Eagle, batch: tuple, head: torch.Tensor, two_steps: bool):
    """(loss, per-step accuracy terms): SmoothL1 on the next feature + 0.1 x cross-entropy on
    the token after it, for the first draft step and, with two_steps, the second."""
    emb, feat, tf, ty, w = batch
    f = model(emb, feat, None)
    outs = [(f, w)]
    if two_steps:  # at position j the layer's own guess of h_j: its output at j - 1
        guess = torch.cat([feat[:, :1], f[:, :-1].detach()], 1)
        w2 = w.clone()
        w2[:, 0] = 0.0
        outs.append((model.second_step(emb, feat, guess), w2))
    loss = torch.zeros(())
    for out, mask in outs:
        m = mask * (ty >= 0)
        reg = (F.smooth_l1_loss(out, tf, reduction="none").mean(-1) * mask).sum() / mask.sum()
        ce = F.cross_entropy((out @ head.T).reshape(-1, head.shape[0]), ty.reshape(-1),
                             ignore_index=-1, reduction="none").view(ty.shape)  # fmt: skip
        loss = loss + reg + 0.1 * (ce * m).sum() / m.sum()
    return loss, outs


def train_eagle(
    d: dict, head: torch.Tensor, vmap: np.ndarray, cfg: dict, minutes: float,
    init: dict | None = None, two_steps: bool = False, lr: float = 5e-4,
) -> dict:  # fmt: skip
    train_ids, held_ids = split(len(d["offsets"]) - 1)
    model = Eagle(cfg)
    if init is not None:  # continue from trained heads (EAGLE_NAMES' tensors)
        by_name = {v: k for k, v in EAGLE_NAMES.items()}
        model.load_state_dict({by_name[k]: torch.from_numpy(v) for k, v in init.items()
                               if k in by_name})  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    std = float(d["hidden"][:: max(1, len(d["hidden"]) // 20000)].astype(np.float32).std())
    end, start = time.time() + minutes * 60, time.time()
    step, rng = 0, np.random.default_rng(2)
    while time.time() < end:
        for seqs in eagle_batches(d, train_ids, rng, 16):
            if time.time() >= end:
                break
            frac = (time.time() - start) / (minutes * 60)
            for g in opt.param_groups:
                warm = min(1.0, step / 50 + 0.02)
                g["lr"] = lr * warm * (0.55 + 0.45 * math.cos(math.pi * frac))
            batch = eagle_tensors(d, seqs, vmap, 0.2 * std)
            loss, _ = eagle_loss(model, batch, head, two_steps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"eagle step {step} loss {loss.item():.4f}", flush=True)
    acc = eagle_accuracy(model, d, held_ids, head, vmap)
    print(f"eagle: {step} steps, held-out top-1 accuracy of the first and second drafts {acc}")
    sd = {n: p.detach().numpy() for n, p in model.named_parameters()}
    return {"tensors": {EAGLE_NAMES[k]: v for k, v in sd.items()}, "accuracy": acc, "steps": step}


def eagle_accuracy(model: Eagle, d: dict, ids: np.ndarray, head: torch.Tensor, vmap) -> list:
    """Held-out top-1 accuracy of the first draft, and of the second given its own first guess
    of the feature (the token before it taken as right)."""
    good, total = [0, 0], [0, 0]
    with torch.no_grad():
        for i in range(0, len(ids), 16):
            batch = eagle_tensors(d, ids[i : i + 16], vmap, 0.0)
            _, outs = eagle_loss(model, batch, head, two_steps=True)
            ty = batch[3]
            for s, (out, mask) in enumerate(outs):
                m = (mask > 0) & (ty >= 0)
                good[s] += int((((out @ head.T).argmax(-1) == ty) & m).sum())
                total[s] += int(m.sum())
    return [round(g / max(1, t), 4) for g, t in zip(good, total, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("features", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--medusa-heads", type=int, default=4)
    ap.add_argument("--minutes-medusa", type=float, default=4)
    ap.add_argument("--minutes-eagle", type=float, default=15)
    ap.add_argument("--eagle-intermediate", type=int, default=0, help="0: the target's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eagle-init", type=Path, default=None, help="continue from these heads")
    ap.add_argument("--eagle-two-steps", action="store_true",
                    help="also train the second draft step on the layer's own guess")  # fmt: skip
    ap.add_argument("--eagle-lr", type=float, default=5e-4)
    ap.add_argument("--only", choices=["medusa", "eagle"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from mlctrio.runtime.spec_heads import write_heads

    d = load(args.features)
    tc = json.loads(str(d["target_config"]))
    vocab = d["draft_vocab"]
    vmap = np.full(tc["vocab_size"], -1, np.int64)
    vmap[vocab] = np.arange(len(vocab))
    head = torch.from_numpy(d["embed"][vocab] / np.float32(tc.get("embed_scale", 1.0)))
    target = {"name": args.name, **{k: tc[k] for k in ("hidden_size", "vocab_size",
                                                       "num_hidden_layers")}}  # fmt: skip
    common = {"target": target, "draft_vocab_size": len(vocab),
              "positions": len(d["tokens"]), "sequences": int(len(d["offsets"]) - 1)}  # fmt: skip
    if args.only in (None, "medusa"):
        m = train_medusa(d, head, vmap, args.medusa_heads, args.minutes_medusa)
        write_heads(args.out / f"{args.name}-medusa",
                    {"kind": "medusa", "num_heads": args.medusa_heads, **common,
                     "trained": {"steps": m["steps"], "held_out_accuracy": m["accuracy"]}},
                    {**m["tensors"], "draft_vocab": vocab})  # fmt: skip
    if args.only in (None, "eagle"):
        cfg = {k: tc[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                  "head_dim", "rope_theta", "rms_norm_eps")}  # fmt: skip
        cfg["intermediate_size"] = args.eagle_intermediate or tc["intermediate_size"]
        init = None
        if args.eagle_init is not None:
            from mlctrio.runtime.spec_heads import read_heads

            init = read_heads(args.eagle_init, "eagle")[1]
        e = train_eagle(d, head, vmap, cfg, args.minutes_eagle, init, args.eagle_two_steps,
                        args.eagle_lr)  # fmt: skip
        write_heads(args.out / f"{args.name}-eagle",
                    {"kind": "eagle", **cfg, **common,
                     "trained": {"steps": e["steps"], "held_out_accuracy": e["accuracy"]}},
                    {**e["tensors"], "draft_vocab": vocab})  # fmt: skip


if __name__ == "__main__":
    main()
