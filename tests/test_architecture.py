"""The architecture's rules, checked: the simulator stands on numpy and the format alone, the
generated C header is the committed one, one cache survives concurrent writers."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np

import mixkvq
from mixkvq import KVCache, MixKVQConfig
from mixkvq.format import c_header

ROOT = Path(__file__).resolve().parent.parent
#: What the pure simulator modules may import (sim/backend.py adapts the simulator to the
#: Backend protocol, so it alone also sees mixkvq.backend / mixkvq.dtypes).
SIM_ALLOWED = {"numpy", "math", "dataclasses", "typing", "__future__", "mixkvq.format",
               "ml_dtypes"}  # optional: only to hand out bfloat16 arrays


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_simulator_imports_only_numpy_and_the_format():
    for path in sorted((ROOT / "sim").glob("*.py")):
        if path.name in ("backend.py", "__init__.py"):
            continue
        extra = _imports(path) - SIM_ALLOWED
        assert not extra, f"sim/{path.name} imports {sorted(extra)}; the spec may stand only on {sorted(SIM_ALLOWED)}"


def test_the_format_module_is_the_bottom_layer():
    extra = {n for n in _imports(ROOT / "mixkvq" / "format.py") if n.startswith("mixkvq")}
    assert not extra, f"mixkvq/format.py imports {sorted(extra)}"


def test_the_committed_c_header_is_generated_from_the_format_module():
    committed = (ROOT / "backends" / "cupy" / "kernels" / "mixkvq_format.h").read_text()
    assert committed == c_header(), "regenerate it: python -c 'import mixkvq.format as f; print(f.c_header(), end=\"\")'"


def test_two_threads_appending_to_one_cache_lose_nothing():
    """Mutations are serialised: every chunk of both writers lands, none is half-applied."""
    cfg = MixKVQConfig(policy="key_only", group_size=8, residual_length=16)
    cache = KVCache(cfg, backend="numpy")
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((1, 2, 3, 16)).astype(np.float32)
    errors: list[BaseException] = []

    def writer():
        try:
            for _ in range(40):
                cache.append(chunk, chunk)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.seq_len == 2 * 40 * 3
    serial = KVCache(cfg, backend="numpy")
    for _ in range(80):
        serial.append(chunk, chunk)
    assert cache.nbytes == serial.nbytes
    for a, b in zip(cache.dequantized(), serial.dequantized()):
        assert np.array_equal(a, b)  # identical chunks: any interleaving gives the same stream


def test_the_public_api_is_typed_and_documented():
    for name in mixkvq.__all__:
        obj = getattr(mixkvq, name)
        if callable(obj) and not isinstance(obj, int):
            assert (obj.__doc__ or "").strip(), f"mixkvq.{name} has no docstring"
