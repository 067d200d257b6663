"""Freeing the blocks a sliding-window layer never reads again."""

from __future__ import annotations

import numpy as np
import pytest

from mixkvq import KVCache, MixKVQConfig
from mixkvq.io import save_cache


@pytest.mark.parametrize("backend", ["numpy", "cpu", "torch"])
@pytest.mark.parametrize("value_window", ["block", "sliding"])
def test_freeing_outside_the_window_changes_no_attention_result(backend, value_window, tmp_path):
    if backend != "numpy":
        pytest.importorskip("torch")
    cfg = MixKVQConfig(policy="key_only", group_size=8, residual_length=16, value_window=value_window)
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((2, 2, 100, 32)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 4, 3, 32)).astype(np.float32)
    cache = KVCache(cfg, backend=backend)
    cache.append(k, v)
    before = np.asarray(cache.backend.to_numpy(cache.attention(q, window=20)))
    freed = cache.free_before(100 - 3 - 20 + 1)
    assert freed == cache.n_freed == 64 and cache.n_held == 36 and cache.seq_len == 100
    after = np.asarray(cache.backend.to_numpy(cache.attention(q, window=20)))
    assert np.abs(after - before).max() < 1e-6
    assert cache.free_before(10) == 0  # nothing more to free
    cache.append(k[:, :, :20], v[:, :, :20])  # streaming continues; positions stay absolute
    assert cache.seq_len == 120 and cache.n_held == 56
    with pytest.raises(ValueError, match="already freed"):
        cache.crop(10)
    with pytest.raises(ValueError, match="cannot be saved"):
        save_cache(cache, tmp_path / "c.mkvq")
