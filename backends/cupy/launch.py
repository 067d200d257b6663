"""Launchers: the one place where the GPU and the CPU emulation differ.

Every op builds its grid, block and argument list once (backends/cupy/backend.py) and
hands them to ``launcher.launch``; the launcher checks the arguments against the kernel
table (types, contiguity, array kind) and only then calls CuPy (:class:`CupyLauncher`) or
the g++-built library of the same .cu source (:class:`mixkvq.backends.cupy.cpu.CpuLauncher`).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

import numpy as np

from . import kernels as K

_SCALAR_TYPES = {"i": np.int32, "q": np.int64, "f": np.float32}


class Launcher:
    """Base class: argument checking shared by both launchers.

    Attributes:
        xp: the array module (cupy or numpy).
        sm_count: multiprocessors the geometry is planned for.
        name: "cuda" or "cpu".
    """

    xp: Any
    sm_count: int
    name: str

    def is_array(self, x: Any) -> bool:
        return isinstance(x, self.xp.ndarray)

    def launch(self, name_expr: str, grid: Sequence[int], block: Sequence[int], args: Sequence[Any]) -> None:
        sig = K.signature_of(name_expr)
        if len(args) != len(sig):
            raise TypeError(f"{name_expr}: {len(args)} arguments given, the kernel takes {len(sig)}")
        for i, (code, a) in enumerate(zip(sig, args)):
            if code == "p":
                if not self.is_array(a):
                    raise TypeError(f"{name_expr}: argument {i} must be a {self.xp.__name__} array, got {type(a).__name__}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name_expr}: argument {i} must be C-contiguous")
            elif type(a) is not _SCALAR_TYPES[code]:
                raise TypeError(f"{name_expr}: argument {i} must be {_SCALAR_TYPES[code].__name__}, got {type(a).__name__}")
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if min(grid) < 1 or min(block) < 1:
            raise ValueError(f"{name_expr}: empty launch grid {grid} block {block}")
        self._launch(name_expr, grid, block, list(args))

    def _launch(self, name_expr: str, grid: tuple, block: tuple, args: list) -> None:  # pragma: no cover
        raise NotImplementedError


class CupyLauncher(Launcher):
    """Launches on the current CUDA device through CuPy.

    Modules are compiled with NVRTC once per (source hash, options, arch, NVRTC version) and
    cached in memory and on disk under ``kernels.cache_root()/cuda`` (cubin + mangled names).
    """

    name = "cuda"

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(f"the cupy backend needs CuPy (pip install 'mixkvq[cupy]'): {exc}") from exc
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
            raise RuntimeError(f"the cupy backend needs a CUDA GPU, and none is usable here: {exc}") from exc
        if n < 1:
            raise RuntimeError("the cupy backend needs a CUDA GPU, and none is present")
        self.xp = cupy
        dev = cupy.cuda.Device()
        self.sm_count = int(dev.attributes["MultiProcessorCount"])
        self.arch = str(dev.compute_capability)
        self._modules: dict[str, tuple[Any, dict[str, str]]] = {}
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _cache_key(self, module: str, source: str) -> str:
        import hashlib

        from cupy.cuda import nvrtc

        h = hashlib.sha256()
        for part in (source, "\0".join(K.CUDA_OPTIONS), self.arch, str(nvrtc.getVersion())):
            h.update(part.encode() + b"\0")
        return f"{module}-sm{self.arch}-{h.hexdigest()[:24]}"

    def _module(self, module: str) -> tuple[Any, dict[str, str]]:
        with self._lock:
            if module in self._modules:
                return self._modules[module]
            import cupy
            from cupy.cuda import compiler

            source = K.read_source(module)
            names = list(K.MODULES[module][1])
            folder = K.cache_root() / "cuda"
            key = self._cache_key(module, source)
            cubin_path, names_path = folder / f"{key}.cubin", folder / f"{key}.json"
            if cubin_path.exists() and names_path.exists():
                mapping = json.loads(names_path.read_text())
            else:
                cubin, mapping = compiler.compile_using_nvrtc(
                    source, K.CUDA_OPTIONS, None, filename=K.MODULES[module][0], name_expressions=names)
                mapping = {n: (mapping or {}).get(n, n) for n in names}
                folder.mkdir(parents=True, exist_ok=True)
                tmp = cubin_path.with_suffix(f".tmp{threading.get_ident()}")
                tmp.write_bytes(cubin)
                tmp.replace(cubin_path)
                names_path.write_text(json.dumps(mapping))
            mod = cupy.RawModule(path=str(cubin_path))
            self._modules[module] = (mod, mapping)
            return self._modules[module]

    def function(self, name_expr: str) -> Any:
        fn = self._functions.get(name_expr)
        if fn is None:
            mod, mapping = self._module(K.module_of(name_expr))
            fn = self._functions[name_expr] = mod.get_function(mapping[name_expr])
        return fn

    def _launch(self, name_expr, grid, block, args):
        self.function(name_expr)(grid, block, tuple(args))
