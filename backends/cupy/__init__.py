"""CuPy RawKernel (CUDA C) backend, and its CPU emulation.

``CupyBackend`` (registered as ``"cupy"``) runs the kernels of ``kernels/*.cu`` on a CUDA
GPU; ``CupyCpuBackend`` (registered here as ``"cupy-cpu"``) runs the same source on the CPU
through ``kernels/cuda_cpu_compat.h``. Importing this package needs neither a GPU nor CuPy;
constructing ``CupyBackend`` without a usable GPU raises a RuntimeError saying so.
"""

from mixkvq.backend import register_backend

from .backend import CupyBackend, CupyCpuBackend

try:
    register_backend("cupy-cpu", CupyCpuBackend)
except ValueError:  # already registered (e.g. by an entry point of the same name)
    pass

__all__ = ["CupyBackend", "CupyCpuBackend"]
