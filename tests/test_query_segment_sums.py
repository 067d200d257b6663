"""§7 query sums over token segments (``Backend.query_segment_sums``): the native CPU pass
against the simulator's composition bit for bit — every input dtype, strided views (vLLM's
``(T, Hq, D)`` query transposed), Inf saturating, empty segments — and the errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

torch = pytest.importorskip("torch")

from mixkvq import get_backend  # noqa: E402
from mixkvq.backend import available_backends  # noqa: E402
from mixkvq.testing import strategies as S  # noqa: E402

SIM = get_backend("numpy")
CPU = get_backend("cpu")


@st.composite
def _bounds(draw, T: int) -> list[int]:
    inner = draw(st.lists(st.integers(0, T), max_size=6))
    lo = draw(st.integers(0, T))
    hi = draw(st.integers(lo, T))
    return sorted([lo, hi, *[min(max(b, lo), hi) for b in inner]])


@given(shape=S.kv_shapes(max_tokens=40), data=st.data())
def test_native_segment_sums_match_the_simulator(shape, data):
    B, H, n_rep, T, D = shape
    arr = data.draw(S.float_arrays((B, H * n_rep, T, D)))
    bounds = data.draw(_bounds(T))
    q = S.to_backend_input(arr, CPU)
    if data.draw(st.booleans()):  # vLLM's layout: (T, Hq, D) rows seen as (1, Hq, T, D)
        q = q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if data.draw(st.booleans()) and T:  # some Inf (saturates at 2^40, §7 step 2)
        q = q.clone()
        q[tuple(data.draw(st.integers(0, n - 1)) for n in q.shape)] = float("-inf")
    want = SIM.query_segment_sums(SIM.from_any(q.to(torch.float32).numpy()), n_rep, bounds)
    got = CPU.query_segment_sums(q, n_rep, bounds)
    assert got.dtype == torch.int64 and tuple(got.shape) == want.shape
    assert np.array_equal(got.numpy(), want)
    # the composition on the torch backend is the same integers (exact sums: any grouping)
    assert torch.equal(get_backend("torch").query_segment_sums(q, n_rep, bounds), got)


def test_segments_add_up_to_the_running_sum():
    q = torch.randn(2, 6, 300, 64).to(torch.bfloat16)
    seg = CPU.query_segment_sums(q, 3, [0, 128, 256, 300])
    whole = CPU.query_segment_sums(q, 3, [0, 300])
    assert torch.equal(seg.sum(dim=2, keepdim=True), whole)
    assert torch.equal(whole[:, :, 0], CPU.query_token_sums(q, 3).sum(dim=2))


def test_thread_count_does_not_change_the_sums():
    q = torch.randn(1, 9, 4096, 64).to(torch.bfloat16)
    bounds = list(range(0, 4097, 128))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CPU.query_segment_sums(q, 3, bounds)
        torch.set_num_threads(2)
        two = CPU.query_segment_sums(q, 3, bounds)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_nan_is_named():
    q = torch.randn(1, 6, 40, 16)
    q[0, 4, 17, 3] = float("nan")
    with pytest.raises(ValueError, match=r"queries .*nan.* at index \(0, 4, 17, 3\)"):
        CPU.query_segment_sums(q, 2, [0, 40])


@pytest.mark.parametrize("bounds", [[0, 41], [5, 3], [-1, 4], [[0, 1]]])
def test_bad_bounds_are_refused(bounds):
    q = torch.randn(1, 2, 40, 16)
    for backend in (CPU, SIM):
        x = q if backend is CPU else q.numpy()
        with pytest.raises((ValueError, TypeError), match="segment bounds"):
            backend.query_segment_sums(x, 1, bounds)


@pytest.mark.parametrize("name", available_backends())
def test_every_backend_composes_the_same_sums(name):
    try:
        b = get_backend(name)
    except (RuntimeError, OSError) as exc:  # no GPU for cupy, no CuPy installed, no compiler
        pytest.skip(f"backend {name!r} is not usable here: {str(exc).splitlines()[0]}")
    g = np.random.default_rng(3)
    q = (g.standard_normal((2, 6, 70, 24)) * 10.0 ** g.integers(-3, 4, (2, 6, 70, 24))).astype(np.float32)
    q[1, 2, 5, 7] = np.inf
    bounds = [0, 3, 3, 40, 64, 70]
    want = SIM.query_segment_sums(q, 2, bounds)
    assert want.shape == (2, 3, 5, 24) and not want[:, :, 1].any()
    got = b.to_numpy(b.query_segment_sums(b.from_any(q), 2, bounds))
    assert np.array_equal(got, want), name


def test_heads_must_group_by_n_rep():
    with pytest.raises(ValueError, match="not a multiple of n_rep=2"):
        CPU.query_segment_sums(torch.randn(1, 3, 8, 16), 2, [0, 8])
