"""Loading a compiled model library and the process-wide thread settings it runs under.

Threads: TVM's pool sizes itself once, from TVM_NUM_THREADS, at its first parallel kernel (its
default is half the cores on x86). `configure_threads` sets it, and OpenBLAS to one thread because
OpenBLAS workers busy-spin and steal the cores TVM is using; call it before the first step
(TVMRunner's constructor does).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from mlctrio.errors import ModelLoadError
from mlctrio.sizing import usable_cpu_count


def configure_threads(num_threads: int | None = None) -> int:
    """Set TVM_NUM_THREADS (default: every core this process may use) and limit OpenBLAS to 1
    thread. Returns TVM's count.

    An explicit TVM_NUM_THREADS in the environment wins. Takes effect only before TVM's thread pool
    starts (the first parallel kernel in the process).
    """
    n = num_threads or int(os.environ.get("TVM_NUM_THREADS", 0)) or usable_cpu_count()
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # for libraries loaded later
    set_openblas_threads(1)  # numpy's OpenBLAS is already loaded: tell it directly
    return int(os.environ["TVM_NUM_THREADS"])


def set_openblas_threads(n: int) -> None:
    """Set the thread count of the OpenBLAS bundled with numpy (loaded already: env is too late)."""
    libdir = Path(np.__file__).parent.parent / "numpy.libs"
    for path in glob.glob(str(libdir / "lib*openblas*.so*")):
        lib = ctypes.CDLL(path)
        for sym in (
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return


def load_library(lib: str | Path) -> tvm.runtime.Module:
    """dlopen a compiled model library; a missing or broken file is a ModelLoadError. (Cached
    libraries are checked against their sha256 before they get here: compile.read_entry.)"""
    try:
        return tvm.runtime.load_module(str(lib))
    except Exception as exc:  # a missing/corrupt .so surfaces as a generic TVM error
        raise ModelLoadError(f"cannot load compiled model {lib}: {exc}") from exc


def library_build_info(module: tvm.runtime.Module) -> dict[str, Any] | None:
    """The build info the library carries (models/build_info.py), or None when it has none."""
    from mlctrio.models.build_info import BUILD_INFO_FUNC

    try:
        func = optional_function(relax.VirtualMachine(module, tvm.cpu()), BUILD_INFO_FUNC)
    except Exception as exc:  # not a Relax VM library at all
        raise ModelLoadError(f"not an mlctrio model library: {exc}") from exc
    if func is None:
        return None
    try:
        info = json.loads(str(func()))
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def optional_function(vm: relax.VirtualMachine, name: str) -> Any:
    """The VM function `name`, or None when the library does not export it."""
    try:
        return vm[name]
    except AttributeError:  # what the VM raises for an unknown function
        return None
