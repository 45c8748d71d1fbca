"""What a compiled library was built from: its cache key, and the build info it carries.

    cache_key(config, quantization, target)   sha256 over the config, the quantization scheme, the
                                              target, TVM's version and `source_digest()`
    attach_build_info(mod, info)              adds BUILD_INFO_FUNC, a Relax function returning
                                              `info` as JSON, to the module before it is compiled
    build_mismatch(info, config, quantization)  why a library's info does not fit a model, or None

Rules:
- The key is derived, never bumped by hand: `source_digest()` hashes every module of
  mlctrio/models that compile.py reaches through its imports (found by reading their `import`
  statements, so a new kernel module counts as soon as it is imported), computed once per process.
- Every library carries its build info, so a library given with `--model-lib` (a copied file, no
  metadata beside it) can be checked against the model before it serves a request.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tvm
from tvm import relax
from tvm.target import Target

from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import summary

BUILD_INFO_FUNC = "mlctrio_build_info"
_MODELS = Path(__file__).resolve().parent
_PACKAGE = "mlctrio.models"


def _imported_models_modules(path: Path) -> set[str]:
    """The mlctrio.models modules (bare names) `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:  # relative import inside mlctrio/models
                base = f"{_PACKAGE}.{base}" if base else _PACKAGE
            elif node.level > 1:
                continue  # above mlctrio/models: not model code
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name.startswith(_PACKAGE + "."):
                module = name[len(_PACKAGE) + 1 :].split(".")[0]
                if (_MODELS / f"{module}.py").is_file():
                    found.add(module)
    return found


@functools.cache
def codegen_sources() -> tuple[Path, ...]:
    """compile.py and every mlctrio/models module it reaches through imports, sorted."""
    seen: set[str] = set()
    todo = ["compile"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_imported_models_modules(_MODELS / f"{module}.py") - seen)
    return tuple(sorted(_MODELS / f"{m}.py" for m in seen))


@functools.cache
def source_digest() -> str:
    """sha256 over the names and bytes of `codegen_sources()`."""
    digest = hashlib.sha256()
    for path in codegen_sources():
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(config: LlamaConfig, quantization: str, target: Target) -> str:
    material = {
        "config": config.to_dict(),
        "quantization": quantization,
        "target": str(target),
        "tvm": tvm.__version__,
        "sources": source_digest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def build_info(config: LlamaConfig, quantization: str, target: Target, key: str) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "quantization": quantization,
        "target": str(target),
        "target_kind": target.kind.name,
        "tvm": tvm.__version__,
        "key": key,
    }


def attach_build_info(mod: tvm.IRModule, info: Mapping[str, Any]) -> tvm.IRModule:
    """`mod` plus BUILD_INFO_FUNC(), which returns `info` as a JSON string."""
    bb = relax.BlockBuilder()
    with bb.function(BUILD_INFO_FUNC, []):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(dict(info), sort_keys=True)))
    mod[BUILD_INFO_FUNC] = bb.get()[BUILD_INFO_FUNC]
    return mod


def config_digest(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:12]


def describe(config: Mapping[str, Any], quantization: str) -> str:
    """A short human description: scheme, layers, vocabulary, hidden size, config hash."""
    return (
        f"{summary(quantization)}, {config.get('num_hidden_layers')} layers, "
        f"vocab {config.get('vocab_size')}, hidden {config.get('hidden_size')}, "
        f"config {config_digest(config)}"
    )


def build_mismatch(info: Mapping[str, Any], config: LlamaConfig, quantization: str) -> str | None:
    """None when a library built with `info` serves (config, quantization); else one line naming
    what the library was built for and what the model is."""
    built_config = info.get("config")
    built_quant = info.get("quantization")
    if not isinstance(built_config, Mapping) or not isinstance(built_quant, str):
        return "its build info names no config and quantization"
    model_config = config.to_dict()
    if built_quant == quantization and dict(built_config) == model_config:
        return None
    differs = sorted(
        k for k in set(built_config) | set(model_config)
        if built_config.get(k) != model_config.get(k)
    )  # fmt: skip
    detail = ", ".join(
        f"{k} {built_config.get(k)!r} vs {model_config.get(k)!r}" for k in differs[:4]
    )
    if len(differs) > 4:
        detail += f" and {len(differs) - 4} more"
    if built_quant != quantization:
        detail = f"quantization {built_quant} vs {quantization}" + (f", {detail}" if detail else "")
    return (
        f"it was compiled for ({describe(built_config, built_quant)}), the model is "
        f"({describe(model_config, quantization)}): {detail}"
    )
