"""The TVM target a model is compiled for: this machine's CPU, or CUDA.

Rules: only target construction lives here (no model code), so both compile.py and weights.py
(whose packed-param layout depends on the CPU's features) can import it without importing each
other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tvm
from tvm.target import Target


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
