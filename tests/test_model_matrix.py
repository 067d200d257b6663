"""A model matrix without downloads: tiny random-weight models built from transformers config
objects, one per architecture family users bring (full attention, sliding-window, hybrid
sliding/global, soft-capping, QK-norm, MQA, head_dim 256, head_dim != hidden/heads)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixkvq import MixKVQConfig  # noqa: E402
from mixkvq.integrations.transformers import MixKVQCache, enable  # noqa: E402
from mixkvq.integrations.transformers import cache_argument  # noqa: E402

#: the keyword this transformers version takes a cache by (``cache`` in newer 5.x)
ARG = cache_argument(transformers.LlamaForCausalLM)

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _configs():
    t = transformers
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2)),
        "qwen2_sliding": (t.Qwen2Config, t.Qwen2ForCausalLM,
                          dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=24,
                               max_window_layers=1, layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
        "qwen3_qk_norm": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
        "mistral_sliding": (t.MistralConfig, t.MistralForCausalLM,
                            dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=20)),
        "gemma2_softcap_hybrid": (t.Gemma2Config, t.Gemma2ForCausalLM,
                                  dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=16,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
        "gemma3_hybrid_mqa_256": (t.Gemma3TextConfig, t.Gemma3ForCausalLM,
                                  dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=16,
                                       layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2)),
    }


@pytest.fixture(scope="module", params=sorted(_configs()))
def model(request):
    cfg_cls, model_cls, extra = _configs()[request.param]
    torch.manual_seed(0)
    cfg = cfg_cls(**{**BASE, **extra})
    m = model_cls(cfg).eval()
    enable(m)
    return m


def _gen(model, cache, ids, mask=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                                  **{ARG: cache}, pad_token_id=0, **kw)


def _prompt(n=40, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


QUANT = MixKVQConfig(group_size=8, residual_length=16)
NONE = MixKVQConfig(group_size=8, residual_length=512)  # the residual never fills: nothing quantized


def test_nothing_quantized_gives_dynamic_caches_tokens(model):
    from transformers import DynamicCache

    ids = _prompt()
    ref = _gen(model, DynamicCache(config=model.config), ids, max_new_tokens=12, do_sample=False)
    for mode in ("dequantized", "packed"):
        cache = MixKVQCache(NONE, model_config=model.config, attention=mode)
        got = _gen(model, cache, ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, ref), mode
        assert cache.kv_caches[0].n_quantized == 0


def test_packed_and_dequantized_give_the_same_greedy_tokens_once_quantized(model):
    ids = _prompt(45)
    packed = MixKVQCache(QUANT, model_config=model.config)
    got = _gen(model, packed, ids, max_new_tokens=20, do_sample=False)
    ref = _gen(model, MixKVQCache(QUANT, model_config=model.config, attention="dequantized"), ids,
               max_new_tokens=20, do_sample=False)
    assert all(c.n_quantized > 0 for c in packed.kv_caches)
    assert torch.equal(got, ref)


def test_padded_batch_beam_search_and_sampling_run_in_the_default_mode(model):
    ids = _prompt(30, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    packed = _gen(model, MixKVQCache(QUANT, model_config=model.config), ids, mask, max_new_tokens=10, do_sample=False)
    deq = _gen(model, MixKVQCache(QUANT, model_config=model.config, attention="dequantized"), ids, mask,
               max_new_tokens=10, do_sample=False)
    assert torch.equal(packed, deq)
    out = _gen(model, MixKVQCache(QUANT, model_config=model.config), ids, mask, max_new_tokens=6, num_beams=2,
               do_sample=False)
    assert out.shape == (2, 36)
    torch.manual_seed(0)
    out = _gen(model, MixKVQCache(QUANT, model_config=model.config), ids, mask, max_new_tokens=6, do_sample=True,
               num_return_sequences=2)
    assert out.shape == (4, 36)


def test_sliding_layers_free_what_falls_out_of_their_window(model):
    text = model.config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or (
        ["sliding_attention"] * text.num_hidden_layers if getattr(text, "sliding_window", None) else [])
    if "sliding_attention" not in types:
        pytest.skip("no sliding layers in this model")
    window = text.sliding_window
    cache = MixKVQCache(QUANT, model_config=model.config)
    ids = _prompt(40)
    _gen(model, cache, ids, max_new_tokens=60, do_sample=False)
    R = QUANT.residual_length
    for i, kind in enumerate(types):
        layer = cache.layers[i]
        assert layer.is_sliding == (kind == "sliding_attention")
        if layer.is_sliding:
            assert layer.kv.n_freed > 0 and layer.kv.n_held <= window + 2 * R
        else:
            assert layer.kv.n_freed == 0 and layer.kv.n_held == layer.kv.seq_len


def test_layer_implements_the_layer_api_of_this_transformers_version():
    """Every abstract method of this version's CacheLayerMixin is implemented (5.0-5.10 name
    ``get_max_cache_shape``, 5.16+ ``get_max_length``), and ``get_mask_sizes`` takes both the
    ``cache_position`` tensor (5.0) and the query length (5.5+)."""
    from mixkvq.integrations.transformers import MixKVQLayer

    assert not getattr(MixKVQLayer, "__abstractmethods__", None)
    layer = MixKVQLayer(QUANT, backend="torch")
    assert layer.get_mask_sizes(5) == (5, 0)
    assert layer.get_mask_sizes(torch.arange(7)) == (7, 0)
    assert layer.get_max_cache_shape() == layer.get_max_length() == -1
