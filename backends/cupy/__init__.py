"""CuPy RawKernel (CUDA C) backend, and its CPU emulation.

``CupyBackend`` (backend name ``"cupy"``) runs the kernels of ``kernels/*.cu`` on a CUDA
GPU; ``CupyCpuBackend`` (``"cupy-cpu"``) runs the same source on the CPU
through ``kernels/cuda_cpu_compat.h``. Importing this package needs neither a GPU nor CuPy;
constructing ``CupyBackend`` without a usable GPU raises a RuntimeError saying so.
"""

from .backend import CupyBackend, CupyCpuBackend

__all__ = ["CupyBackend", "CupyCpuBackend"]
