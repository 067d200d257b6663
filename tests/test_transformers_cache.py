"""MixKVQCache inside transformers generate() and forward passes, on the embedded model."""

from __future__ import annotations

import warnings

import pytest

from conftest_hf import get_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixkvq import MixKVQConfig  # noqa: E402
from mixkvq.integrations.transformers import cache_argument  # noqa: E402

#: the keyword this transformers version takes a cache by (``cache`` in newer 5.x)
ARG = cache_argument(transformers.LlamaForCausalLM)


@pytest.fixture(scope="module")
def hf():
    return get_model()


def _cache(model, **cfg):
    from mixkvq.integrations.transformers import MixKVQCache

    return MixKVQCache(MixKVQConfig(**cfg), model_config=model.config)


def _gen(model, enc, cache, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**enc, **{ARG: cache}, pad_token_id=0, **kw)


def _batch(tok):
    return tok(["The capital of France is", "Once upon a time, in a land far away, there lived a"],
               return_tensors="pt", padding=True, padding_side="left")


def test_matches_dynamic_cache_when_nothing_is_quantized(hf):
    from transformers import DynamicCache

    model, tok, _ = hf
    enc = _batch(tok)
    ref = _gen(model, enc, DynamicCache(config=model.config), max_new_tokens=12, do_sample=False)
    cache = _cache(model, residual_length=1024)
    got = _gen(model, enc, cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, got)
    assert cache.kv_caches[0].n_quantized == 0
    assert cache.get_seq_length() == ref.shape[1] - 1


def test_quantization_engages_past_residual(hf):
    model, tok, _ = hf
    enc = _batch(tok)
    cache = _cache(model, residual_length=32)
    out = _gen(model, enc, cache, max_new_tokens=24, do_sample=False)
    T = out.shape[1] - 1
    assert cache.get_seq_length() == T
    for kv in cache.kv_caches:
        assert kv.n_quantized == 32 * (T // 32) > 0
    assert cache.bits_per_element < 16
    assert 2.0 < cache.nominal_bits < 4.0
    # quantized tokens never change: a further step leaves earlier blocks' bytes intact
    before = [bytes(torch.as_tensor(a).numpy().tobytes()) if hasattr(a, "numpy") else a.tobytes()
              for a in cache.kv_caches[0].key_blocks[0].arrays()]
    with torch.no_grad():
        model(input_ids=out[:, -1:], **{ARG: cache}, attention_mask=torch.ones(out.shape[0], T + 1, dtype=torch.long))
    after = [bytes(torch.as_tensor(a).numpy().tobytes()) if hasattr(a, "numpy") else a.tobytes()
             for a in cache.kv_caches[0].key_blocks[0].arrays()]
    assert before == after


def test_beam_search_and_sampling_run_on_quantized_storage(hf):
    model, tok, _ = hf
    enc = _batch(tok)
    cache = _cache(model, residual_length=32)
    out = _gen(model, enc, cache, max_new_tokens=28, num_beams=3, do_sample=False)
    assert out.shape[0] == 2 and cache.kv_caches[0].n_quantized > 0
    torch.manual_seed(0)
    cache = _cache(model, residual_length=32)
    out = _gen(model, enc, cache, max_new_tokens=8, do_sample=True, num_return_sequences=2)
    assert out.shape[0] == 4 and cache.kv_caches[0].shape[0] == 4


def test_reorder_and_crop_match_a_fresh_cache(hf):
    """Batch selection and block-aligned crops act on quantized bytes exactly."""
    from mixkvq.integrations.transformers import MixKVQCache

    model, tok, _ = hf
    enc = _batch(tok)
    cfg = MixKVQConfig(residual_length=32, policy="key_only")
    ext = torch.randint(5, 1000, (2, 70))
    with torch.no_grad():
        full = MixKVQCache(cfg, model_config=model.config)
        model(input_ids=ext, **{ARG: full})
        single = MixKVQCache(cfg, model_config=model.config)
        model(input_ids=ext[1:], **{ARG: single})
    full.reorder_cache(torch.tensor([1]))
    a, b = full.kv_caches[5], single.kv_caches[5]
    assert a.n_quantized == b.n_quantized == 64
    for x, y in zip(a.arrays(), b.arrays()):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    # crop inside the residual, then to a block boundary (drops a quantized block)
    full.crop(-3)
    assert full.get_seq_length() == 67 and a.n_quantized == 64
    full.crop(32)
    assert full.get_seq_length() == 32 and a.n_quantized == 32
    with pytest.raises(ValueError, match="re-quantize"):
        full.crop(-5)
    # after a crop the cache keeps working
    with torch.no_grad():
        out = model(input_ids=ext[1:, 32:40], **{ARG: full})
    assert torch.isfinite(out.logits).all() and full.get_seq_length() == 40


def test_query_aware_needs_the_attention_function(hf):
    from mixkvq.integrations.transformers import MixKVQCache

    model, tok, _ = hf
    model.set_attn_implementation("sdpa")
    try:
        cache = MixKVQCache(MixKVQConfig(residual_length=32), model_config=model.config)
        ids = tok("Hello world, this is a test", return_tensors="pt").input_ids
        with torch.no_grad():
            model(input_ids=ids, **{ARG: cache})
            with pytest.raises(RuntimeError, match="mixkvq"):
                model(input_ids=ids[:, -1:], **{ARG: cache})
    finally:
        model.set_attn_implementation("mixkvq")


def test_config_path_and_unsupported_model(tmp_path, hf):
    from mixkvq.apps.data import DataError, check_supported
    from mixkvq.integrations.transformers import MixKVQCache

    model, _, _ = hf
    MixKVQConfig(residual_length=64).save(tmp_path / "c.json")
    cache = MixKVQCache(tmp_path / "c.json", model_config=model.config)
    assert cache.mixkvq_config.residual_length == 64 and len(cache.layers) == model.config.num_hidden_layers

    class Cfg:
        model_type = "t5"

    with pytest.raises(DataError, match="not supported"):
        check_supported(Cfg())


def test_packed_attention_matches_the_dequantized_path_without_forming_the_history(hf):
    """attention='packed' computes attention from the packed cache (no memo); its logits agree
    with SDPA over the dequantized history, and greedy generation gives the same tokens."""
    from mixkvq.integrations.transformers import MixKVQCache

    model, tok, _ = hf
    text = "The history of the city begins in the Roman period, when a small settlement grew along the river. " * 6
    enc = tok([text], return_tensors="pt")
    cfg = MixKVQConfig(residual_length=32)
    deq = MixKVQCache(cfg, model_config=model.config, backend="torch")
    packed = MixKVQCache(cfg, model_config=model.config, attention="packed", backend="torch")
    with torch.no_grad():
        a = model(**enc, **{ARG: deq}).logits[:, -1]
        b = model(**enc, **{ARG: packed}).logits[:, -1]
        assert packed.kv_caches[0].n_quantized > 0
        nxt = a.argmax(-1, keepdim=True)
        mask = torch.ones(1, enc["input_ids"].shape[1] + 1, dtype=torch.long)
        a2 = model(input_ids=nxt, attention_mask=mask, **{ARG: deq}).logits[:, -1]
        b2 = model(input_ids=nxt, attention_mask=mask, **{ARG: packed}).logits[:, -1]
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3) and torch.allclose(a2, b2, atol=2e-3, rtol=1e-3)
    assert all(layer._memo_k is None for layer in packed.layers)
    got = _gen(model, enc, MixKVQCache(cfg, model_config=model.config, attention="packed"), max_new_tokens=8, do_sample=False)
    ref = _gen(model, enc, MixKVQCache(cfg, model_config=model.config, attention="dequantized"), max_new_tokens=8,
               do_sample=False)
    assert torch.equal(got, ref)


def test_padded_batch_in_packed_mode_gives_the_dequantized_modes_tokens(hf):
    """Left-padded prompts of different lengths: the packed path applies the padding mask
    itself (prefill, decode and a multi-token chunk) and picks the harness's greedy tokens."""
    from mixkvq.integrations.transformers import MixKVQCache

    model, tok, _ = hf
    cfg = MixKVQConfig(group_size=8, residual_length=16)
    enc = _batch(tok)
    assert int(enc["attention_mask"].min()) == 0  # really padded
    packed = MixKVQCache(cfg, model_config=model.config, attention="packed")
    got = _gen(model, enc, packed, max_new_tokens=24, do_sample=False)
    ref = _gen(model, enc, MixKVQCache(cfg, model_config=model.config, attention="dequantized"),
               max_new_tokens=24, do_sample=False)
    assert packed.kv_caches[0].n_quantized > 0
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="attention must be one of"):
        MixKVQCache(attention="fast")


def test_the_default_cache_never_holds_a_dequantized_history(hf):
    """The README's cache: packed attention, so no layer memoises dequantized keys/values and
    update() hands the model only the new tokens."""
    from mixkvq.integrations.transformers import MixKVQCache

    model, tok, _ = hf
    cache = MixKVQCache(MixKVQConfig(group_size=8, residual_length=16), model_config=model.config)
    assert cache.attention == "packed"
    enc = tok(["The history of the printing press begins"], return_tensors="pt")
    _gen(model, enc, cache, max_new_tokens=20, do_sample=False)
    layer = cache.layers[0]
    assert layer.kv.n_quantized > 0
    assert all(lay._memo_k is None and lay._memo_v is None for lay in cache.layers)
    k = torch.randn(1, 3, 1, 64)
    out_k, out_v = layer.update(k, k)
    assert out_k.shape[2] == 1  # only the new token: there is no history to return
    import mixkvq.integrations.transformers as integ
    integ._PENDING.set(None)
