"""Backends beyond the NumPy simulator: one sub-package each (torch, cupy)."""
