"""Native CPU backend: C++ kernels (OpenMP threads, SIMD) on torch CPU tensors.

Registered as ``"cpu"`` (``mixkvq.backends.cpu:CpuBackend``). Bit-exact with the simulator
for every stored byte; decode attention is fused and reads the packed cache directly.
The library is compiled with the system C++ compiler the first time it is needed and
cached (see :mod:`mixkvq.backends._native` and docs/cpu.md).
"""

from .backend import CpuBackend, load_library

__all__ = ["CpuBackend", "load_library"]
