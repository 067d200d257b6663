"""The eval's chunked scoring gives every token the cache view of token-by-token decoding."""

from __future__ import annotations

import warnings

import pytest

from mixkvq import MixKVQConfig
from mixkvq.apps.eval.methods import Method


def test_exact_chunk_period_follows_the_storage_rule():
    assert Method("full", "full").exact_chunk_period is None
    assert Method("q", "quanto", options={"nbits": 2}).exact_chunk_period == 1
    assert Method("m", "mixkvq", MixKVQConfig(residual_length=64)).exact_chunk_period == 64
    sliding = MixKVQConfig(residual_length=64, value_window="sliding")
    assert Method("s", "mixkvq", sliding).exact_chunk_period == 1


@pytest.fixture(scope="module")
def hf64():
    """The embedded model in float64: its own matmuls then round alike in any chunking, so
    the two protocols must agree to the byte (in float32 a rare code flips at a rounding
    boundary)."""
    import copy

    from conftest_hf import get_model

    model, tok, _ = get_model()
    return copy.deepcopy(model).double(), tok


def _stored_bytes(cache) -> list[bytes]:
    import numpy as np

    out = []
    for layer in cache.kv_caches:
        for part in (*layer.key_blocks, *layer.value_rows):
            out.extend(np.ascontiguousarray(a.cpu().numpy()).tobytes() for a in part.arrays())
    return out


@pytest.mark.parametrize("config", [MixKVQConfig(group_size=16, residual_length=32),
                                    MixKVQConfig(group_size=16, residual_length=32, tier_mode="rd", rd_bits=4.5)],
                         ids=["budget", "rd"])
def test_exact_chunks_match_token_by_token_across_block_flushes(hf64, config):
    import torch

    from mixkvq.apps.eval.harness import stream
    from mixkvq.apps.eval.methods import build_cache

    model, tok = hf64
    ids = tok("Rivers carry sediment from the mountains to the sea, and deltas grow where the current slows. " * 8,
              return_tensors="pt")["input_ids"][:, :110]
    method = Method("m", "mixkvq", config)
    assert method.exact_chunk_period == 32
    caches = [build_cache(method, model) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # context 40 (one block flushed, 8 tokens in the residual); the 70 scored tokens
        # cross the flushes at 64 and 96
        step, targets, times = stream(model, caches[0], ids, 40, chunk_period=1)
        chunked, targets2, no_times = stream(model, caches[1], ids, 40, chunk_period=32)
        one_chunk, _, _ = stream(model, caches[2], ids, 40, chunk_period=None)
    assert len(times) == 69 and no_times == []
    assert torch.equal(targets, targets2) and step.shape == chunked.shape == one_chunk.shape == (70, model.config.vocab_size)
    assert _stored_bytes(caches[1]) == _stored_bytes(caches[0])
    assert float((chunked - step).abs().max()) < 1e-4
    # one chunk across the flushes reads the stale residual where token-by-token reads blocks
    assert float((one_chunk - step).abs().max()) > 0.05
