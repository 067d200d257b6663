"""Evaluation harness and calibration on a real model (needs the ``hf`` extra).

See :mod:`mixkvq.apps.eval.harness` for the protocol; ``mixkvq eval`` is the command line.
"""

from .methods import FRONTIER_METHODS, FULL_METHODS, QUICK_METHODS, Method, MethodUnavailable, builtin_methods, kivi, resolve_methods

__all__ = ["Method", "MethodUnavailable", "builtin_methods", "kivi", "resolve_methods", "QUICK_METHODS", "FULL_METHODS", "FRONTIER_METHODS"]
