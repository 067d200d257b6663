"""The conformance kit run on the simulator itself (sanity) and on the torch backend."""

import pytest

from mixkvq.testing import CHECKS, check_backend


def test_simulator_conforms_to_itself():
    report = check_backend("numpy", max_examples=5)
    assert set(report.examples) == set(CHECKS)


def test_torch_backend_conforms():
    pytest.importorskip("torch")
    report = check_backend("torch")
    assert all(n > 0 for n in report.examples.values()), report


def test_native_cpu_backend_conforms():
    """The C++ backend: every stored byte as the simulator's, attention within tolerance
    (building it here is the CI check that the native source compiles)."""
    pytest.importorskip("torch")
    report = check_backend("cpu")
    assert all(n > 0 for n in report.examples.values()), report
