"""Compile a Llama config + quantization into a shared library, with an on-disk JIT cache.

`compile_model(config, "q4f32_1")` returns a `CompiledModel` (library path + packed-param layout).
The cache key (build_info.cache_key) is sha256 over the config, quantization, target, TVM version
and a digest of the model sources that shape the compiled code: no version to bump by hand. The
cache directory is an argument; its default is <$MLCTRIO_CACHE_DIR or ~/.cache/mlctrio>/lib
(resolved here, at the API edge, not deep inside).

Cache entries follow cache_files.py: `<key>.so` is written under a temporary name and renamed,
then `<key>.json` (params, build info, size + sha256 of the library) is written last, atomically.
A library is used only after it matches its `.json` (checked before anything dlopens it: a
truncated library mapped into the process dies of SIGBUS); a bad or half-written entry is
logged in one line and rebuilt. A flock on `.<key>.lock` makes a second process wait for the
first one's compile instead of compiling again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import tvm
from tvm.target import Target

from mlctrio.config import cache_root
from mlctrio.models.build_info import attach_build_info, build_info, cache_key
from mlctrio.models.cache_files import (
    check_record,
    file_record,
    fsync_file,
    locked,
    report_corrupt,
    write_atomic,
)
from mlctrio.models.llama import LlamaForCausalLM
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import as_scheme, summary
from mlctrio.models.schedules import cpu_schedule_pass, tag_foreign_pass
from mlctrio.models.target import host_cpu_target as host_cpu_target
from mlctrio.models.target import resolve_target
from mlctrio.models.weights import ParamInfo

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The `lib` folder of the cache root ($MLCTRIO_CACHE_DIR or ~/.cache/mlctrio)."""
    return cache_root() / "lib"


@attrs.frozen
class CompiledModel:
    """A compiled library plus what is needed to feed it."""

    lib_path: Path
    config: LlamaConfig
    quantization: str
    params: list[ParamInfo]
    cache_hit: bool
    compile_s: float


def build_irmodule(
    config: LlamaConfig, quantization: str, target: Target
) -> tuple[tvm.IRModule, list[ParamInfo]]:
    """Export the nn model to Relax (param_mode packed) and list its params."""
    scheme = as_scheme(quantization)
    act_dtype = "float32" if target.kind.name == "llvm" else scheme.default.mlc_dtype
    model = LlamaForCausalLM(config, scheme, target, act_dtype)
    mod, named = model.export_tvm(spec=model.get_default_spec())
    infos = [ParamInfo.of(n, p) for n, p in named]
    return mod, infos


SENTINEL_SYMBOL = "zzzz_mlctrio_codegen_sentinel"


def _sentinel_func() -> tvm.tirx.PrimFunc:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def sentinel(a: T.Buffer((1,), "int32")) -> None:
        T.func_attr({"global_symbol": SENTINEL_SYMBOL, "tirx.noalias": True})
        a[0] = a[0]

    return sentinel


def _sentinel_last_func_pass() -> tvm.transform.Pass:
    """Add a no-op `tirx.noalias` PrimFunc whose name sorts after every other one.

    Works around a TVM 0.27 LLVM codegen quirk (measured, see docs/discussion/0002): the parallel
    loop bodies ("parallel lambdas") of all functions are emitted after the functions, with the
    `noalias` setting of the function code-generated *last* (functions go in name order). Our
    modules end with KV-cache kernels or VM shape functions that lack the attribute, so every
    parallel kernel lost its no-alias guarantees: LLVM kept the matmul accumulators in memory
    and reloaded operands, and every matmul ran 1.5-2.7x slower than the same kernel built alone.
    A last function with the attribute restores it. The kernels that declare no `noalias`
    (stock and own KV-cache/attention kernels) are never called with overlapping buffers.
    """

    @tvm.transform.module_pass(opt_level=0, name="MlctrioCodegenSentinel")
    def _add(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod[SENTINEL_SYMBOL] = _sentinel_func()
        return mod

    return _add


def _pipeline(target: Target) -> tvm.transform.Pass:
    # The backend `pipeline` submodules, not their packages: tvm 0.27's cpu_generic/__init__ does
    # not re-export dataflow_lower_passes, so relax.pipeline.dataflow_lower_passes fails for llvm.
    if target.kind.name == "llvm":
        from tvm.relax.backend.cpu_generic import pipeline as rp
    else:
        from tvm.relax.backend.cuda import pipeline as rp

    # TVM's per-target legalize passes already end with dlight GPU schedules for cuda; for the CPU
    # our own schedule pass runs right after FuseTIR.
    passes = [tag_foreign_pass(), *rp.library_dispatch_passes(target), *rp.legalize_passes(target)]
    if target.kind.name == "llvm":
        passes.append(cpu_schedule_pass())
    passes += [*rp.dataflow_lower_passes(target), *rp.finalize_passes(target)]
    if target.kind.name == "llvm":  # a CPU codegen quirk: the kernels run in parallel lambdas
        passes.append(_sentinel_last_func_pass())

    @tvm.transform.module_pass(opt_level=0, name="MlctrioPipeline")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def compile_model(
    config: LlamaConfig,
    quantization: str,
    *,
    target: str | Target | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> CompiledModel:
    """Return the library for (config, quantization, target), compiling only on a cache miss."""
    tgt = resolve_target(target)
    key = cache_key(config, quantization, tgt)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    lib_path, meta_path = root / f"{key}.so", root / f"{key}.json"
    if not force:
        infos, _ = read_entry(lib_path, meta_path, key)  # the common case: no lock needed
        if infos is not None:
            log.info(
                "compile cache hit: %s (%s, %s)",
                lib_path.name,
                summary(quantization),
                tgt.kind.name,
            )
            return CompiledModel(lib_path, config, quantization, infos, True, 0.0)
    with locked(root / f".{key}.lock"):
        if not force:
            infos, problem = read_entry(lib_path, meta_path, key)
            if infos is not None:  # compiled by another process while this one waited
                log.info("compile cache hit: %s (compiled meanwhile)", lib_path.name)
                return CompiledModel(lib_path, config, quantization, infos, True, 0.0)
            if problem is not None:
                report_corrupt(log, lib_path, problem)
        return _compile_entry(config, quantization, tgt, key, lib_path, meta_path)


def read_entry(
    lib_path: Path, meta_path: Path, key: str
) -> tuple[list[ParamInfo] | None, str | None]:
    """(param infos, None) for a sound entry; (None, None) when there is none; (None, why) when
    it is bad. Reads every byte of the library (a few MB) to check its sha256."""
    if not meta_path.exists():
        return None, ("library without metadata" if lib_path.exists() else None)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None, f"{meta_path.name} describes another entry"
        infos = [
            ParamInfo(p["name"], tuple(p["shape"]), p["dtype"], p.get("layout", ""))
            for p in meta["params"]
        ]
        record = {"size": meta["size"], "sha256": meta["sha256"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{meta_path.name} is unreadable: {type(exc).__name__}: {exc}"
    problem = check_record(lib_path, record)
    return (None, problem) if problem is not None else (infos, None)


def _compile_entry(
    config: LlamaConfig, quantization: str, tgt: Target, key: str, lib_path: Path, meta_path: Path
) -> CompiledModel:
    """Compile and write the entry: library first (temp + rename), its metadata last."""
    log.info(
        "compiling %s for %s (cache miss, key %s)", summary(quantization), tgt.kind.name, key[:12]
    )
    t0 = time.perf_counter()
    mod, infos = build_irmodule(config, quantization, tgt)
    info = build_info(config, quantization, tgt, key)
    ex = tvm.compile(attach_build_info(mod, info), target=tgt, relax_pipeline=_pipeline(tgt))
    meta_path.unlink(missing_ok=True)  # the old entry (if any) stops vouching for anything
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".so", dir=lib_path.parent)
    os.close(fd)
    try:
        ex.export_library(tmp)
        fsync_file(Path(tmp))
        record = file_record(Path(tmp))
        os.replace(tmp, lib_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta: dict[str, Any] = {**info, "params": [attrs.asdict(p) for p in infos], **record}
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    elapsed = time.perf_counter() - t0
    log.info("compiled %s in %.1f s -> %s", summary(quantization), elapsed, lib_path)
    return CompiledModel(lib_path, config, quantization, infos, False, elapsed)
