"""The simulator reproduces the committed golden vectors byte for byte."""

from pathlib import Path

import numpy as np
import pytest

from mixkvq.format import FORMAT_VERSION
from mixkvq.testing.golden import cases, check_vectors

VECTORS = Path(__file__).parent / "vectors" / "v1"


def test_simulator_reproduces_golden_vectors():
    assert check_vectors(VECTORS) == []


def test_torch_backend_reproduces_golden_vectors():
    pytest.importorskip("torch", reason="the torch backend needs torch (pip install 'mixkvq[torch]')")
    assert check_vectors(VECTORS, backend="torch") == []


def test_cuda_kernels_on_the_cpu_reproduce_golden_vectors():
    """The CUDA C sources, compiled for the CPU, against every golden case."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the CUDA sources cannot be built for the CPU")
    assert check_vectors(VECTORS, backend="cupy-cpu") == []


def test_manifest_covers_every_case():
    import json

    manifest = json.loads((VECTORS / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert [c["name"] for c in manifest["cases"]] == [name for name, *_ in cases()]
    kinds = {c["kind"] for c in manifest["cases"]}
    assert kinds == {"pack", "quantize", "half", "cache", "error"}
    for c in manifest["cases"]:  # docs §10: a cache case's stream is the legacy string or a list of operations
        if c["kind"] == "cache":
            assert c["stream"] == "one append(keys, values, queries) of all tokens" or (
                isinstance(c["stream"], list) and all(op["op"] in ("append", "observe_queries", "crop", "select_batch")
                                                      for op in c["stream"]))
            assert set(c["config"]) >= set(c["params"])
    assert {c["params"]["bits"] for c in manifest["cases"] if c["kind"] == "quantize"} == set(range(1, 9))
    assert {c["kind"] for c in manifest["cases"] if "expect" in c} == {"error"}


def test_a_flipped_byte_is_detected(tmp_path):
    """The checker itself can fail: corrupt one stored output and it must be reported."""
    import shutil

    shutil.copytree(VECTORS, tmp_path / "v1")
    target = tmp_path / "v1" / "quant_b3_float16_f16in.npz"
    with np.load(target) as data:
        arrays = {k: data[k].copy() for k in data.files}
    arrays["out_packed"][0, 0] ^= 1
    np.savez_compressed(target, **arrays)
    assert check_vectors(tmp_path / "v1") == ["quant_b3_float16_f16in:packed"]


def test_an_expected_rejection_that_is_not_raised_is_detected(tmp_path):
    """An error case whose input no longer fails must be reported, not silently passed."""
    import shutil

    shutil.copytree(VECTORS, tmp_path / "v1")
    target = tmp_path / "v1" / "error_non_finite.npz"
    with np.load(target) as data:
        arrays = {k: data[k].copy() for k in data.files}
    arrays["in_x"][np.isnan(arrays["in_x"]) | np.isinf(arrays["in_x"])] = 0.0
    np.savez_compressed(target, **arrays)
    assert check_vectors(tmp_path / "v1") == ["error_non_finite:expect"]
