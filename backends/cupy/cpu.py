"""Run the CUDA kernels on the CPU: the same .cu source, compiled by g++ with
kernels/cuda_cpu_compat.h, called through ctypes (see docs/cuda.md).

The library of each module is built once per source hash (every file of the kernel folder,
the generated launch wrappers, the compiler and its flags) into ``kernels.cache_root()/cpu``.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .._native import build_library
from . import kernels as K
from .launch import Launcher

#: g++ flags: IEEE float semantics exactly as the CUDA compile (no contraction into FMA,
#: no fast math), optimised enough that thread emulation is not dominated by the kernels.
CXX_FLAGS = ("-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread")

_CTYPES = {"i": ctypes.c_int32, "q": ctypes.c_int64, "f": ctypes.c_float}


def wrapper_source(module: str) -> str:
    """The generated translation unit: compat header, the module's .cu, and one
    ``extern "C"`` launch + signature function per kernel of the table."""
    lines = [f'#include "{K.COMPAT_HEADER}"', f'#include "{K.MODULES[module][0]}"', 'extern "C" {']
    for i, name in enumerate(K.MODULES[module][1]):
        lines.append(
            f"void mixkvq_launch_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,"
            f" void** argv) {{ cuda_cpu::launch(&{name}, dim3(gx, gy, gz), dim3(bx, by, bz), argv); }}")
        lines.append(f"const char* mixkvq_signature_{i}() {{ return cuda_cpu::signature(&{name}); }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def build(module: str) -> Path:
    """Compile (or find in the cache) the shared library of ``module``; return its path."""
    return build_library(module, wrapper_source(module), include_dirs=[K.KERNEL_DIR], flags=CXX_FLAGS, subfolder="cpu")


class CpuLauncher(Launcher):
    """Runs each launch on the CPU, one OS thread per CUDA thread (arrays are NumPy arrays).

    ``sm_count`` is what the geometry plans for; it is small, so grid-stride loops do most
    of the work and fewer blocks (and barriers) are emulated.
    """

    name = "cpu"
    sm_count = 2

    def __init__(self) -> None:
        self.xp = np
        self._libs: dict[str, Any] = {}
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def function(self, name_expr: str) -> Any:
        with self._lock:
            fn = self._functions.get(name_expr)
            if fn is not None:
                return fn
            module = K.module_of(name_expr)
            if module not in self._libs:
                lib = ctypes.CDLL(str(build(module)))
                names = list(K.MODULES[module][1])
                for i, n in enumerate(names):  # the Python table must match the C++ declarations
                    sig_fn = getattr(lib, f"mixkvq_signature_{i}")
                    sig_fn.restype = ctypes.c_char_p
                    actual = sig_fn().decode()
                    if actual != K.MODULES[module][1][n]:
                        raise RuntimeError(f"kernel table says {n} takes {K.MODULES[module][1][n]!r}; "
                                           f"the source declares {actual!r}")
                self._libs[module] = (lib, names)
            lib, names = self._libs[module]
            fn = getattr(lib, f"mixkvq_launch_{names.index(name_expr)}")
            fn.restype = None
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
            self._functions[name_expr] = fn
            return fn

    def _launch(self, name_expr, grid, block, args):
        fn = self.function(name_expr)
        sig = K.signature_of(name_expr)
        holders = []
        for code, a in zip(sig, args):
            holders.append(ctypes.c_void_p(a.ctypes.data) if code == "p" else _CTYPES[code](a.item()))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        fn(*grid, *block, argv)
