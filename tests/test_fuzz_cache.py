"""Fuzzing the cache's operation sequences: append / observe_queries / crop / select_batch /
free_before / save+load / attention interleaved at random, with good and bad inputs, on a
native backend and on the simulator side by side, against a model of the expected state.

After every step: the backend's cache holds exactly the simulator's bytes; the token count
is the model's; the residual is the model's tokens bit for bit and the quantized tokens lie
within the quantization error of the model's; attention is finite and within the documented
tolerance of the float64 reference. Every rejected call names the tensor or argument it
rejects and leaves both caches exactly as they were.

Bounded by the Hypothesis profile (``ci``: 12 sequences of up to 25 steps per machine;
``MIXKVQ_HYPOTHESIS_PROFILE=thorough``: 300). Runs in well under a minute on ``ci``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mixkvq import KVCache, MixKVQConfig
from mixkvq.backend import available_backends
from mixkvq.io import CacheFileError, load_cache, save_cache
from mixkvq.testing.conformance import assert_attention_close, attention_tolerance, compare_caches

B0, H, N_REP, D = 2, 2, 2, 16
R, G = 16, 8

CONFIGS = {
    "budget": MixKVQConfig(residual_length=R, group_size=G, budget=(1, 4)),
    "threshold": MixKVQConfig(residual_length=R, group_size=G, tier_mode="threshold", thresholds=(0.6, 0.2),
                              meta_dtype="bfloat16"),
    "rd": MixKVQConfig(residual_length=R, group_size=G, tier_mode="rd", rd_bits=7.0, policy="key_only"),
    "kivi-sliding": MixKVQConfig(policy="uniform", low_bits=3, value_bits=3, residual_length=R, group_size=G,
                                 value_window="sliding"),
    "key_only-f32meta": MixKVQConfig(residual_length=R, group_size=G, policy="key_only", meta_dtype="float32"),
}


def _state_bytes(cache: KVCache) -> tuple:
    """Everything a cache holds: counters and every array's bytes, in order."""
    s = cache.state
    be = cache.backend if s.geometry is not None else None
    arrays = tuple(np.ascontiguousarray(be.to_numpy(a)).tobytes() for a in s.arrays()) if be else ()
    return (s.n_tokens, s.storage.freed, s.stats.position, s.stats.count, tuple(sorted(s.stats.snapshots)), arrays)


def _bound(x: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Half a quantization step of the groups of ``G`` along ``axis`` that contain each element,
    plus the metadata's rounding (bfloat16 at worst: 2^-8 relative), broadcast to ``x``."""
    moved = np.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    pad = (-n) % G
    grouped = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)], mode="edge").reshape(*moved.shape[:-1], -1, G)
    lo, hi = grouped.min(-1, keepdims=True), grouped.max(-1, keepdims=True)
    err = (hi - lo) / (2 ** bits - 1) * 0.5 * (1 + 2.0**-6) + (np.abs(hi) + np.abs(lo)) * 2.0**-7 + 1e-6
    err = np.broadcast_to(err, grouped.shape).reshape(*moved.shape[:-1], -1)[..., :n]
    return np.moveaxis(err, -1, axis)


class CacheMachine(RuleBasedStateMachine):
    """One cache on ``BACKEND`` and its twin on the simulator, fed the same calls."""

    BACKEND = "cpu"

    @initialize(kind=st.sampled_from(sorted(CONFIGS)), dtype=st.sampled_from(["float32", "float16"]),
                seed=st.integers(0, 2**16))
    def setup(self, kind: str, dtype: str, seed: int) -> None:
        self.config = CONFIGS[kind]
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.sut = KVCache(self.config, backend=self.BACKEND)
        self.twin = KVCache(self.config, backend="numpy")
        self.batch = B0
        self.keys = np.zeros((B0, H, 0, D), self.dtype)  # the model: every token still held
        self.values = np.zeros((B0, H, 0, D), self.dtype)
        self.observed = 0  # stream tokens whose queries were observed
        self.n_rep: int | None = None
        self.freed = 0

    # -- helpers ---------------------------------------------------------------------------------
    def _tokens(self, n: int, heads: int = H) -> np.ndarray:
        x = self.rng.standard_normal((self.batch, heads, n, D)) * self.rng.uniform(0.1, 3.0, (1, heads, 1, D))
        x[..., 3] *= 8.0  # an outlier channel
        return x.astype(self.dtype)

    def _queries(self, n: int) -> np.ndarray:
        return self._tokens(n, H * (self.n_rep or N_REP))

    def _both(self, method: str, *args, native_args=None, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # blocks waiting for queries warn once
            getattr(self.twin, method)(*args, **kwargs)
            getattr(self.sut, method)(*(native_args if native_args is not None else args), **kwargs)

    def _rejected(self, method: str, args: tuple, kinds: tuple, names: tuple[str, ...]) -> None:
        """Both caches reject the call with a message naming one of ``names``; nothing changes."""
        before = (_state_bytes(self.sut), _state_bytes(self.twin))
        for cache in (self.twin, self.sut):
            with pytest.raises(kinds) as info:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    getattr(cache, method)(*args)
            assert any(n in str(info.value) for n in names), f"{method}: {info.value!r} names none of {names}"
        assert (_state_bytes(self.sut), _state_bytes(self.twin)) == before, f"a rejected {method} changed the cache"

    @property
    def n_tokens(self) -> int:
        return self.freed + int(self.keys.shape[2])

    # -- good calls ------------------------------------------------------------------------------
    @rule(n=st.integers(0, 40), with_queries=st.booleans())
    def append(self, n: int, with_queries: bool) -> None:
        if self.sut.seq_len == 0 and n == 0:
            n = 1
        k, v = self._tokens(n), self._tokens(n)
        q = self._queries(n) if with_queries and self.observed == self.n_tokens else None
        self._both("append", k, v, queries=q)
        if q is not None:
            self.observed += n
            self.n_rep = q.shape[1] // H
        self.keys = np.concatenate([self.keys, k], axis=2)
        self.values = np.concatenate([self.values, v], axis=2)

    @precondition(lambda self: self.sut.shape is not None)
    @rule()
    def decode_step(self) -> None:
        """One token with its query, as generation appends it (when no queries lag)."""
        self.append(1, True)

    @precondition(lambda self: self.n_tokens > self.observed)
    @rule(data=st.data())
    def observe(self, data) -> None:
        n = data.draw(st.integers(1, self.n_tokens - self.observed))
        self._both("observe_queries", self._queries(n))
        self.n_rep = self.n_rep or N_REP
        self.observed += n

    @precondition(lambda self: self.n_tokens > 0)
    @rule(data=st.data())
    def crop(self, data) -> None:
        nq = self.twin.n_quantized
        keep = data.draw(st.one_of(st.integers(max(nq, self.freed), self.n_tokens),
                                   st.integers(self.freed // R, self.n_tokens // R).map(lambda j: j * R)))
        keep = max(keep, self.freed)
        if keep < nq and keep % R:
            return
        self._both("crop", keep)
        if keep < self.n_tokens:
            self.keys, self.values = self.keys[:, :, : keep - self.freed], self.values[:, :, : keep - self.freed]
            self.observed = min(self.observed, keep)

    @precondition(lambda self: self.sut.shape is not None)
    @rule(idx=st.lists(st.integers(0, B0 - 1), min_size=1, max_size=3))
    def select_batch(self, idx: list[int]) -> None:
        idx = [i % self.batch for i in idx]
        self._both("select_batch", np.array(idx))
        self.keys, self.values, self.batch = self.keys[idx], self.values[idx], len(idx)

    @precondition(lambda self: self.n_tokens > 0)
    @rule(data=st.data())
    def free_before(self, data) -> None:
        position = data.draw(st.integers(0, self.n_tokens))
        freed_before = self.twin.n_freed
        self._both("free_before", position)
        assert self.sut.n_freed == self.twin.n_freed
        gone = self.twin.n_freed - freed_before
        self.keys, self.values = self.keys[:, :, gone:], self.values[:, :, gone:]
        self.freed += gone

    @precondition(lambda self: self.sut.shape is not None)
    @rule()
    def save_and_load(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.mkvq"
            try:
                save_cache(self.sut, path)
            except Exception as exc:  # only a freed prefix cannot be written (whole-history format)
                assert self.freed > 0 and "freed" in str(exc), repr(exc)
                return
            loaded = load_cache(path, backend=self.BACKEND)
        compare_caches(loaded, self.twin, loaded.backend)
        self.sut = loaded

    @precondition(lambda self: self.sut.shape is not None and self.sut.n_held > 0)
    @rule(tq=st.integers(1, 3), causal=st.booleans())
    def attention(self, tq: int, causal: bool) -> None:
        tq = min(tq, self.sut.n_held)
        q = self._tokens(tq, H * N_REP).astype(np.float32)
        got = self.sut.attention(q, causal=causal)
        assert np.isfinite(np.asarray(got)).all()
        expected = self.twin.attention(q, causal=causal)
        keys, values = (np.asarray(a, np.float32) for a in self.twin.dequantized())
        tol = attention_tolerance(q, keys, values, D ** -0.5)
        assert_attention_close(np.asarray(got, np.float32), np.asarray(expected, np.float32), tol, "attention")

    # -- bad calls -------------------------------------------------------------------------------
    @rule(where=st.sampled_from(["keys", "values"]), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
          n=st.integers(1, 20))
    def append_nonfinite(self, where: str, bad: float, n: int) -> None:
        k, v = self._tokens(n), self._tokens(n)
        x = k if where == "keys" else v
        x[self.rng.integers(self.batch), self.rng.integers(H), self.rng.integers(n), self.rng.integers(D)] = bad
        self._rejected("append", (k, v), (ValueError,), (where,))

    @precondition(lambda self: self.sut.shape is not None)
    @rule(what=st.sampled_from(["heads", "head_dim", "batch", "dtype", "mismatch"]))
    def append_bad_shape(self, what: str) -> None:
        k, v = self._tokens(3), self._tokens(3)
        if what == "heads":
            k = v = np.concatenate([k, k], axis=1)
        elif what == "head_dim":
            k = v = k[..., :-1]
        elif what == "batch":
            k = v = np.concatenate([k, k], axis=0)
        elif what == "dtype":
            k, v = k.astype(np.float64), v.astype(np.float64)
        else:
            v = v[:, :, :2]
        self._rejected("append", (k, v), (ValueError, TypeError), ("keys", "values"))

    @precondition(lambda self: self.sut.shape is not None)
    @rule()
    def observe_too_many(self) -> None:
        self._rejected("observe_queries", (self._queries(self.n_tokens - self.observed + 1),), (ValueError,),
                       ("queries",))

    @precondition(lambda self: self.twin.n_quantized > self.freed + 1)
    @rule(data=st.data())
    def crop_inside_a_block(self, data) -> None:
        nq = self.twin.n_quantized
        keep = data.draw(st.integers(self.freed + 1, nq - 1).filter(lambda k: k % R))
        self._rejected("crop", (keep,), (ValueError,), ("block",))

    @precondition(lambda self: self.sut.shape is not None)
    @rule(bad=st.sampled_from([[-1], [B0 + 5], []]))
    def select_bad(self, bad: list[int]) -> None:
        bad = [b if b < 0 or b == -1 else self.batch + 5 for b in bad]
        self._rejected("select_batch", (np.array(bad, dtype=np.int64),), (ValueError,), ("batch ind",))

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def same_bytes_as_the_simulator(self) -> None:
        if getattr(self, "sut", None) is None or self.sut.shape is None:
            return
        compare_caches(self.sut, self.twin, self.sut.backend)

    @invariant()
    def holds_the_model_tokens(self) -> None:
        if getattr(self, "sut", None) is None:
            return
        assert self.sut.seq_len == self.twin.seq_len == self.n_tokens
        assert self.sut.n_freed == self.freed and self.sut.query_position == self.observed
        if self.sut.shape is None or self.sut.n_held == 0:
            return
        keys, values = (np.asarray(self.sut.backend.to_numpy(a), np.float32) for a in self.sut.dequantized())
        assert keys.shape == self.keys.shape and values.shape == self.values.shape
        mk, mv = self.keys.astype(np.float32), self.values.astype(np.float32)
        nk = self.sut.n_quantized - self.freed
        nv = sum(r.n_tokens for r in self.sut.value_rows)
        # residuals: exact
        assert np.array_equal(keys[:, :, nk:], mk[:, :, nk:]) and np.array_equal(values[:, :, nv:], mv[:, :, nv:])
        # quantized tokens: within the coarsest width's half step of their groups
        kb = min(w for w in self.config.key_tier_bits)
        vb = min(getattr(self.config.keys, "value_ladder", (self.config.values.bits,)))
        if nk:
            err = np.abs(keys[:, :, :nk] - mk[:, :, :nk])
            assert (err <= _bound(mk[:, :, :nk], 2, kb)).all(), float(err.max())
        if nv:
            err = np.abs(values[:, :, :nv] - mv[:, :, :nv])
            assert (err <= _bound(mv[:, :, :nv], 3, vb)).all(), float(err.max())


def _machine(backend: str) -> type:
    return type(f"CacheMachine_{backend.replace('-', '_')}", (CacheMachine,), {"BACKEND": backend})


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cache_operation_sequences(backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    machine = _machine(backend)
    base = settings()
    machine.TestCase.settings = settings(base, stateful_step_count=25, deadline=None)
    machine.TestCase("runTest").runTest()
