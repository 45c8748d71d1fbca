"""Medusa heads and EAGLE draft layers on disk: reading, writing, and finding the shipped ones.

A heads directory holds `config.json` and `model.safetensors`, with the tensor names of the
Medusa and EAGLE checkpoints mlc-llm converts (`medusa_head.{i}.0.linear.weight|bias`;
`fc.weight|bias`, `layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj
.weight`, `layers.0.post_attention_layernorm.weight`), plus `draft_vocab`: the target ids the
heads score. mlctrio's heads share the target's (tied) LM head, restricted to that draft
vocabulary, so a draft costs a fraction of a full LM head; the LM head rows come from the target
itself at load time and are not stored. Heads for a model with an untied LM head carry its rows
for the draft vocabulary as `lm_head.weight` (N, hidden).

Rules:

* `config.json`'s "target" names the model the heads were trained for (name, hidden size,
  vocabulary, layers); `find_shipped` picks heads whose target matches the served model, so
  `--speculative-mode medusa|eagle` needs no further flag for the models mlctrio ships heads for
  (mlctrio/runtime/heads/, built by scripts/spec_heads/). `--additional-models DIR` names others.
* Any mismatch (shape, vocabulary, kind) is a one-line ConfigError: wrong heads could only
  lower acceptance, never the output, but silently useless heads help nobody.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

SHIPPED = Path(__file__).parent / "heads"
Arrays = dict[str, npt.NDArray[Any]]


def read_heads(path: Path, kind: str) -> tuple[dict[str, Any], Arrays]:
    """(config, float32 tensors and int32 draft_vocab) of a heads directory."""
    from safetensors.numpy import load_file

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{kind} heads {path}: cannot read them ({exc})") from None
    if config.get("kind") != kind:
        raise ConfigError(f"{path} holds {config.get('kind')!r} heads, not {kind}")
    out = {k: v.astype(np.int32 if k == "draft_vocab" else np.float32) for k, v in tensors.items()}
    return config, out


def write_heads(path: Path, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    """Write a heads directory (float tensors as float16, draft_vocab as int32)."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    stored = {
        k: np.ascontiguousarray(v, dtype=np.int32 if k == "draft_vocab" else np.float16)
        for k, v in tensors.items()
    }
    save_file(stored, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")


def matches(config: Mapping[str, Any], model_config: Any) -> bool:
    target = config.get("target", {})
    return all(
        target.get(k) == getattr(model_config, k)
        for k in ("hidden_size", "vocab_size", "num_hidden_layers")
    )


def find_shipped(kind: str, model_config: Any, root: Path = SHIPPED) -> Path | None:
    """The shipped heads of `kind` trained for a model shaped like `model_config`, if any."""
    if not root.is_dir():
        return None
    for path in sorted(root.iterdir()):
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if config.get("kind") == kind and matches(config, model_config):
            return path
    return None


def check_target(path: Path, config: Mapping[str, Any], model_config: Any) -> None:
    if not matches(config, model_config):
        raise ConfigError(
            f"heads {path} were trained for {config.get('target', {}).get('name', 'another model')}"
            f" (hidden {config.get('target', {}).get('hidden_size')}, vocabulary "
            f"{config.get('target', {}).get('vocab_size')}), not for the served model"
        )


def check_shapes(path: Path, kind: str, config: Mapping[str, Any], tensors: Arrays, hidden: int,
                 vocab_size: int) -> None:  # fmt: skip
    """ConfigError unless every tensor the `kind` heads need is there with the shape the served
    model (hidden size, vocabulary) and the heads' config imply."""
    vocab = tensors.get("draft_vocab")
    if vocab is None or vocab.ndim != 1 or not len(vocab):
        raise ConfigError(f"{kind} heads {path}: no draft_vocab")
    if vocab.min() < 0 or vocab.max() >= vocab_size:
        raise ConfigError(f"{kind} heads {path}: draft_vocab ids outside the vocabulary")
    want: dict[str, tuple[int, ...]] = {}
    if "lm_head.weight" in tensors:
        want["lm_head.weight"] = (len(vocab), hidden)
    if kind == "medusa":
        k = 0
        while f"medusa_head.{k}.0.linear.weight" in tensors:
            want[f"medusa_head.{k}.0.linear.weight"] = (hidden, hidden)
            want[f"medusa_head.{k}.0.linear.bias"] = (hidden,)
            k += 1
        if not k:
            raise ConfigError(f"medusa heads {path}: no medusa_head.0.0.linear.weight")
    else:
        try:
            q = int(config["num_attention_heads"]) * int(config["head_dim"])
            kv = int(config["num_key_value_heads"]) * int(config["head_dim"])
            inter = int(config["intermediate_size"])
            float(config["rope_theta"]), float(config["rms_norm_eps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"eagle heads {path}: config.json lacks {exc}") from None
        a, m = "layers.0.self_attn.", "layers.0.mlp."
        want.update({
            "fc.weight": (hidden, 2 * hidden), "fc.bias": (hidden,),
            a + "q_proj.weight": (q, hidden), a + "k_proj.weight": (kv, hidden),
            a + "v_proj.weight": (kv, hidden), a + "o_proj.weight": (hidden, q),
            m + "gate_proj.weight": (inter, hidden), m + "up_proj.weight": (inter, hidden),
            m + "down_proj.weight": (hidden, inter),
            "layers.0.post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    for name, shape in want.items():
        got = tensors.get(name)
        if got is None or tuple(got.shape) != shape:
            found = "missing" if got is None else f"shaped {tuple(got.shape)}"
            raise ConfigError(f"{kind} heads {path}: {name} is {found}, expected {shape}")
