"""CuPy RawKernel (CUDA C) backend."""
