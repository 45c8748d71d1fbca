"""Compile a Llama config + quantization into a shared library, with an on-disk JIT cache.

`compile_model(config, "q4f32_1")` returns a `CompiledModel` (library path + packed-param layout).
The cache key is sha256 over (config, quantization, target, tvm version, SCHEDULE_VERSION), so any
change in the schedules must bump SCHEDULE_VERSION. The cache directory is an argument; its default
is <$MLCTRIO_CACHE_DIR or ~/.cache/mlctrio>/lib (resolved here, at the API edge, not deep inside).
"""

from __future__ import annotations

import hashlib
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
from mlctrio.models.llama import LlamaForCausalLM
from mlctrio.models.llama_config import LlamaConfig
from mlctrio.models.quantization import as_scheme
from mlctrio.models.schedules import SCHEDULE_VERSION, cpu_schedule_pass, tag_foreign_pass
from mlctrio.models.weights import ParamInfo

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The `lib` folder of the cache root ($MLCTRIO_CACHE_DIR or ~/.cache/mlctrio)."""
    return cache_root() / "lib"


def host_cpu_target(num_cores: int | None = None) -> Target:
    """LLVM target for this machine's CPU.

    `-mcpu=native` is rejected by TVM 0.27, so the CPU name comes from LLVM's host detection.
    fast-math reassoc/contract let LLVM vectorise float dot-product reductions (accuracy ~1e-6).
    """
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    attrs_: dict[str, Any] = {
        "kind": "llvm",
        "mcpu": cpu,
        "num-cores": num_cores or os.cpu_count() or 1,
        "fast-math-reassoc": True,
        "fast-math-contract": True,
    }
    # A hypervisor may hide AVX-512 on a CPU whose name implies it: then name a generic CPU and
    # list the features the kernel actually reports, so the library never hits SIGILL.
    flags = _cpu_flags()
    if flags and cpu.startswith(
        ("znver4", "znver5", "sapphirerapids", "icelake", "skylake-avx512")
    ):
        if "avx512f" not in flags:
            attrs_["mcpu"] = "x86-64-v3" if "avx2" in flags else "x86-64"
        elif "avx512_vnni" not in flags:  # the int8 kernels (int8_cpu.py) would SIGILL
            attrs_["mattr"] = ["-avx512vnni"]
    return Target(attrs_)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_target(target: str | Target | None) -> Target:
    """None or "llvm"/"cpu" -> host CPU target; "cuda" -> CUDA (untested here); else as given."""
    if target is None or target in ("llvm", "cpu"):
        return host_cpu_target()
    if isinstance(target, Target):
        return target
    if target == "cuda":
        return Target({"kind": "cuda", "arch": "sm_80"}, host=host_cpu_target())
    return Target(target)


@attrs.frozen
class CompiledModel:
    """A compiled library plus what is needed to feed it."""

    lib_path: Path
    config: LlamaConfig
    quantization: str
    params: list[ParamInfo]
    cache_hit: bool
    compile_s: float


def cache_key(config: LlamaConfig, quantization: str, target: Target) -> str:
    material = {
        "config": config.to_dict(),
        "quantization": quantization,
        "target": str(target),
        "tvm": tvm.__version__,
        "schedule": SCHEDULE_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


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
    if not force and lib_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        infos = [
            ParamInfo(p["name"], tuple(p["shape"]), p["dtype"], p.get("layout", ""))
            for p in meta["params"]
        ]
        log.info("compile cache hit: %s (%s, %s)", lib_path.name, quantization, tgt.kind.name)
        return CompiledModel(lib_path, config, quantization, infos, True, 0.0)

    log.info("compiling %s for %s (cache miss, key %s)", quantization, tgt.kind.name, key[:12])
    t0 = time.perf_counter()
    mod, infos = build_irmodule(config, quantization, tgt)
    ex = tvm.compile(mod, target=tgt, relax_pipeline=_pipeline(tgt))
    # Write under a temporary name and rename: a concurrent reader never sees a partial library.
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_lib = Path(tmp) / "lib.so"
        ex.export_library(str(tmp_lib))
        os.replace(tmp_lib, lib_path)
    meta = {
        "config": config.to_dict(),
        "quantization": quantization,
        "target": str(tgt),
        "params": [attrs.asdict(p) for p in infos],
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    elapsed = time.perf_counter() - t0
    log.info("compiled %s in %.1f s -> %s", quantization, elapsed, lib_path)
    return CompiledModel(lib_path, config, quantization, infos, False, elapsed)
