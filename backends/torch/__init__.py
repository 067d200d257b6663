"""PyTorch backend: docs/numerics.md on torch tensors, bit-exact with the simulator.

Registered as ``"torch"`` (``mixkvq.backends.torch:TorchBackend``). Works on any device
torch supports (CPU, CUDA) with the same code.
"""

from .backend import TorchBackend

__all__ = ["TorchBackend"]
