"""The rotated rows of ``mixkvq eval``: the per-token baseline (mixkvq/apps/eval/rotated.py)
stores the §11 rotation followed by §3 quantization, byte for byte; every stored byte is
counted; the model sees the history as stored before each call (so chunked scoring is exact);
rotation + KIVI and MixKVQ with rotated tiers are core configs (§11.6); a tiny random-weight
model runs through them."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixkvq import sim  # noqa: E402
from mixkvq.apps.eval.harness import stream  # noqa: E402
from mixkvq.apps.eval.methods import (FRONTIER_METHODS, ROTATED_FRONTIER, build_cache, builtin_methods,  # noqa: E402
                                      cache_stats)
from mixkvq.schemes import TierRotation, UniformKeys  # noqa: E402
from mixkvq.apps.eval.rotated import RotatedCache, RotatedLayer  # noqa: E402
from mixkvq.format import row_bytes  # noqa: E402
from mixkvq.integrations.transformers import cache_argument, enable  # noqa: E402

G, R = 8, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = transformers.LlamaForCausalLM(cfg).eval()
    enable(m)
    return m


def _small(method):
    """A catalog method at G=8, R=16 (the tiny model's head size is 16)."""
    if method.kind == "rotated":
        return dataclasses.replace(method, options={**method.options, "group_size": G, "residual_length": R})
    return dataclasses.replace(method, config=method.config.replace(group_size=G, residual_length=R))


def _ids(n=70, seed=1):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_catalog_names_the_rows():
    cat = builtin_methods()
    for name in ("rot_tok2", "rot_tok3", "rot_tok4", "rot_tok_k4v2"):
        assert cat[name].kind == "rotated"
        assert cat[name].exact_chunk_period == 128
    assert cat["rot_tok_k4v2"].options["key_bits"] == 4 and cat["rot_tok_k4v2"].options["value_bits"] == 2
    both = TierRotation("tiers", values=True)
    kivi = cat["rot_kivi_k3v2"]
    assert kivi.kind == "mixkvq" and kivi.config == cat["kivi_k3v2"].config.replace(rotation=both)
    assert isinstance(kivi.config.keys, UniformKeys) and kivi.exact_chunk_period == 128
    for name in ("mixkvq", "mixkvq_thr", "rd3.25", "rd4.03125"):
        rot = cat[f"{name}_rot"]
        assert rot.config == cat[name].config.replace(rotation=both)
    assert cat["mixkvq_rotlow"].config.rotation == TierRotation("low")
    assert cat["mixkvq_rotv"].config.rotation == TierRotation(values=True)
    assert set(ROTATED_FRONTIER) <= set(FRONTIER_METHODS)


def test_layer_budget_rows_with_groups_of_128_split_the_budget_at_g128():
    from mixkvq.apps.layer_budget import LayerProfile

    profile = LayerProfile((3.0, 3.25, 3.5), ((0.3, 0.2, 0.1), (0.9, 0.5, 0.1)), {})
    cat = builtin_methods(layer_profile=profile)
    assert "rdl3.25_g128" in cat and "rdl3.25_g128" not in builtin_methods()
    row = cat["rdl3.25_g128"]
    assert row.config == cat["rd3.25_g128"].config and row.layer_profile is profile
    per_layer = row.layer_configs
    assert [c.keys.bits for c in per_layer.values()] == [3.0, 3.5]  # the sensitive layer gets the bits
    assert all(c.group_size == 128 for c in per_layer.values())
    rot = cat["rdl3.25_g128_rot"]
    assert rot.config.rotation == TierRotation("tiers", values=True) and rot.layer_profile is profile


@pytest.mark.parametrize("backend", ["numpy", "torch", "cpu"])
def test_stored_history_is_the_rotation_then_per_token_quantization(backend):
    """The history a later call sees = sim: rotate (§11), quantize per token (§3), dequantize
    (§4), rotate back — bit for bit, for keys and values; the residual exact."""
    if backend == "cpu":
        from mixkvq.integrations.transformers import native_cpu_status

        if native_cpu_status() is not None:
            pytest.skip(native_cpu_status())
    rng = np.random.default_rng(0)
    B, H, D, T = 2, 2, 24, 2 * R + 5  # D = 24: blocks of 16 and 8 channels (§11.1's default)
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k[..., 3] *= 30  # an outlier channel
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    layer = RotatedLayer(key_bits=3, value_bits=2, group_size=G, residual_length=R, seed=11, backend=backend)
    layer.update(torch.from_numpy(k), torch.from_numpy(v))
    extra = torch.zeros(B, H, 1, D)
    hk, hv = layer.update(extra, extra)
    s = sim.sign_vector(D, 11)
    for x, got, bits in ((k, hk, 3), (v, hv, 2)):
        q = x[:, :, : 2 * R]
        rot = sim.hadamard(q, signs=s)
        packed, scale, zero = sim.quantize(rot, bits, G, "float16")
        back = sim.hadamard(sim.dequantize(packed, scale, zero, bits, G, D, "float32"), signs=s, inverse=True)
        want = np.concatenate([back, x[:, :, 2 * R:], np.zeros((B, H, 1, D), np.float32)], axis=2)
        assert got.dtype == torch.float32 and got.shape == (B, H, T + 1, D)
        assert got.numpy().tobytes() == want.tobytes()
    # every stored byte: codes + float16 scale and zero per G channels per token, and the residual
    per_token = B * H * ((row_bytes(D, 3) + row_bytes(D, 2)) + 2 * 2 * 2 * math.ceil(D / G))
    assert layer.nbytes == 2 * R * per_token + 2 * B * H * (T + 1 - 2 * R) * D * 4
    assert layer.n_elements == 2 * B * H * (T + 1) * D


def test_rotated_kivi_holds_exactly_the_kivi_rows_bytes(model):
    """Rotation changes no byte count: rot_kivi2 holds as many bytes as kivi2 on the same tokens."""
    cat = builtin_methods()
    ids = _ids()
    stats = {}
    for name in ("kivi2", "rot_kivi2", "rot_tok2"):
        method = _small(cat[name])
        cache = build_cache(method, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stream(model, cache, ids, 40, chunk_period=method.exact_chunk_period)
        stats[name] = cache_stats(cache)
    assert stats["rot_kivi2"] == stats["kivi2"]
    # per-token keys have no tier map: 8 bits per channel per block fewer than KIVI
    H, D, L = 2, 16, 2
    assert stats["kivi2"]["nbytes"] - stats["rot_tok2"]["nbytes"] == L * H * D * (70 - 70 % R) // R
    assert stats["rot_tok2"]["block_bits"] == 2 + 2 * 16 / G  # codes + float16 scale and zero per G


def test_chunked_scoring_sees_what_token_by_token_sees(model):
    method = _small(builtin_methods()["rot_tok3"])
    ids = _ids(60)
    a, _, _ = stream(model, build_cache(method, model), ids, 25, chunk_period=1)
    b, _, _ = stream(model, build_cache(method, model), ids, 25, chunk_period=method.exact_chunk_period)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_quality_orders_by_bits_and_generation_runs(model):
    """8-bit rotated per-token caches are all but exact, 2-bit ones are not; generate works."""
    ids = _ids(80)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0, 29:-1].float(), -1)
    err = {}
    for bits in (2, 8):
        cache = RotatedCache(key_bits=bits, value_bits=bits, group_size=G, residual_length=R,
                             model_config=model.config)
        logp, _, _ = stream(model, cache, ids, 30, chunk_period=R)
        err[bits] = float((logp - ref).abs().max())
    assert err[8] < 2e-3 < err[2]
    cache = build_cache(_small(builtin_methods()["rot_kivi3"]), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids[:, :40], attention_mask=torch.ones_like(ids[:, :40]), max_new_tokens=6,
                             do_sample=False, pad_token_id=0, **{cache_argument(model): cache})
    assert out.shape == (1, 46)
    assert cache.get_seq_length() == 45


def test_bad_arguments_are_refused_up_front():
    with pytest.raises(ValueError, match="key_bits"):
        RotatedCache(key_bits=9)
    with pytest.raises(ValueError, match="group_size"):
        RotatedCache(group_size=0)


@pytest.mark.parametrize("name", ["mixkvq_rot", "rd3.25_rot", "mixkvq_thr_rot", "mixkvq_rotlow"])
def test_mixkvq_with_rotated_tiers_runs_in_the_model(model, name):
    """The rotated MixKVQ rows are real caches: the same bytes as their unrotated row, other
    logits, both close to full precision."""
    cat = builtin_methods()
    plain_name = name.replace("_rotlow", "").replace("_rot", "")
    ids = _ids(80)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0, 29:-1].float(), -1)
    out = {}
    for n in (plain_name, name):
        m = cat[n]
        if m.config.tier_mode == "rd":  # G=8, R=16 blocks cost more metadata: a budget above their floor
            m = dataclasses.replace(m, config=m.config.replace(rd_bits=7.0))
        method = _small(m)
        cache = build_cache(method, model)
        logp, _, _ = stream(model, cache, ids, 30, chunk_period=method.exact_chunk_period)
        out[n] = (logp, cache_stats(cache))
    assert out[name][1]["nbytes"] == out[plain_name][1]["nbytes"]
    assert not torch.equal(out[name][0], out[plain_name][0])
    for logp, _ in out.values():
        assert float((logp - ref).abs().max()) < 1.0


# -- the Lloyd–Max (TurboQuant-MSE style) rows ---------------------------------------------------------
def test_lloyd_max_levels_are_the_centroids_of_their_cells():
    """Each level is the mean of the standard normal over its cell (cells split at the
    midpoints): the Lloyd–Max optimality conditions, to float32 precision."""
    from mixkvq.apps.eval.rotated import LLOYD_MAX_LEVELS, lloyd_max_codebook

    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    for bits in LLOYD_MAX_LEVELS:
        levels, thresholds = lloyd_max_codebook(bits)
        assert levels.shape == (2**bits,) and thresholds.shape == (2**bits - 1,)
        assert torch.equal(levels, -levels.flip(0)) and bool((levels[1:] > levels[:-1]).all())
        lv = [float(x) for x in levels.double()]
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(lv, lv[1:])] + [math.inf]
        for i, level in enumerate(lv):
            a, b = edges[i], edges[i + 1]
            centroid = ((pdf(a) if a > -math.inf else 0.0) - (pdf(b) if b < math.inf else 0.0)) / (cdf(b) - cdf(a))
            assert centroid == pytest.approx(level, abs=2e-6), (bits, i)


def test_lloyd_max_rows_store_codes_and_a_float16_norm_per_token():
    from mixkvq.apps.eval.rotated import lloyd_max_codebook

    torch.manual_seed(1)
    layer = RotatedLayer(key_bits=3, value_bits=2, codebook="lloyd_max", residual_length=R)
    k, v = torch.randn(1, 2, 2 * R + 5, 64), torch.randn(1, 2, 2 * R + 5, 64)
    k[..., 7] *= 30.0                       # an outlier channel: the rotation spreads it
    v[0, 1, 3] = 0.0                        # a zero token: norm 0, decoded as zeros
    layer.update(k, v)
    assert layer.n_quantized == 2 * R
    # bytes: per token and head ceil(64 b / 8) bytes of codes and 2 of norm; the residual exact
    assert layer.quantized_nbytes == 1 * 2 * 2 * R * ((64 * 3 // 8 + 2) + (64 * 2 // 8 + 2))
    assert layer.nbytes == layer.quantized_nbytes + 2 * 1 * 2 * 5 * 64 * 4
    kr = layer.rotation.apply(k[:, :, :2 * R])
    vr = layer.rotation.apply(v[:, :, :2 * R])
    for x, bits, (packed, norm), back in ((kr, 3, layer.store.stored[0], layer._memo_k),
                                          (vr, 2, layer.store.stored[1], layer._memo_v)):
        assert norm.dtype == torch.float16 and norm.shape == (1, 2, 2 * R, 1)
        sigma = norm.float() / 8.0
        levels, _ = lloyd_max_codebook(bits)
        codes = get_codes(packed, bits)
        # every coordinate decodes to its nearest level (the codebook's cells)
        y = torch.where(sigma > 0, x / torch.where(sigma > 0, sigma, 1.0), 0.0)
        nearest = (y[..., None] - levels).abs().argmin(-1)
        assert bool(((levels[codes.long()] - y).abs() <= (levels[nearest] - y).abs() + 1e-6).all())
        rel = float(((back - layer.rotation.apply(x, inverse=True)) ** 2).mean() / (x**2).mean())
        assert rel < {3: 0.045, 2: 0.14}[bits]   # Lloyd–Max MSE of N(0,1): 0.0345 (3 bits), 0.1175 (2)
    assert bool((layer._memo_v[0, 1, 3] == 0).all())


def get_codes(packed, bits):
    from mixkvq.backend import get_backend

    return get_backend("torch").unpack(packed, bits, 64)


def test_lloyd_max_rows_refuse_what_they_cannot_store():
    with pytest.raises(ValueError, match="1..4 bits"):
        RotatedCache(key_bits=8, codebook="lloyd_max")
    with pytest.raises(ValueError, match="codebook"):
        RotatedCache(codebook="nf4")
    layer = RotatedLayer(key_bits=2, value_bits=2, codebook="lloyd_max", residual_length=R)
    k = torch.full((1, 1, R, 64), 1e4)
    with pytest.raises(ValueError, match="norm of batch 0, head 0, token 0 overflows float16"):
        layer.update(k, torch.ones_like(k))
    cat = builtin_methods()
    assert cat["rot_lm_k4v2"].options == {"key_bits": 4, "value_bits": 2, "codebook": "lloyd_max",
                                          "residual_length": 128, "seed": 0}
