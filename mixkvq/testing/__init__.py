"""Conformance kit: cross-validate a backend against the simulator (docs/conformance.md).

    >>> from mixkvq.testing import check_backend
    >>> check_backend("torch", max_examples=20)   # raises ConformanceError on a mismatch

Also exported: the Hypothesis strategies (:mod:`mixkvq.testing.strategies`), the op table
:data:`OP_CASES`, and the comparison helpers used by the checks.
"""

from . import strategies
from .conformance import (
    CHECKS, OP_CASES, ConformanceError, ConformanceReport, OpCase, assert_attention_close,
    assert_same_array, attention_tolerance, check_backend, check_op, compare_caches, convert_storage,
)
from .profiles import register_profiles

__all__ = [
    "check_backend", "ConformanceError", "ConformanceReport", "CHECKS", "OP_CASES", "OpCase",
    "check_op", "compare_caches", "convert_storage", "attention_tolerance", "assert_attention_close",
    "assert_same_array", "register_profiles", "strategies",
]
