"""The MixKVQ attention backend on vLLM's CPU engine (docs/vllm.md).

The page-layout tests run everywhere. The engine tests need the vLLM environment and the
exported model folder: ``bash scripts/test_vllm.sh`` builds both and runs this file there
(CI does, after the main suite). Elsewhere they are skipped with the reason — unless
``MIXKVQ_REQUIRE_VLLM=1`` (set by that script), where a missing engine or model folder
fails. One engine is shared by the module (its start-up takes ~45 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from mixkvq import MixKVQConfig
from mixkvq.format import ITEMSIZE
from mixkvq.integrations.vllm.pages import PageLayout

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRED = os.environ.get("MIXKVQ_REQUIRE_VLLM") == "1"
if REQUIRED and not HAVE_VLLM:
    raise RuntimeError("MIXKVQ_REQUIRE_VLLM=1 but vllm is not importable: run this file with the vLLM venv's python "
                       "(bash scripts/test_vllm.sh)")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed here; it runs in its own environment "
                                "(bash scripts/test_vllm.sh builds it and runs this file there)")


# -- the page layout (no vLLM needed) -----------------------------------------------------------------
@pytest.mark.parametrize("heads,head_dim", [(3, 64), (8, 128), (1, 64), (4, 96)])
def test_page_holds_the_format_bytes_plus_query_sums(heads, head_dim):
    cfg = MixKVQConfig()
    p = PageLayout(cfg, heads, head_dim)
    fmt = p.format_block_bytes()  # CostModel: tier maps, key tiers, values
    qsums = 8 * heads * head_dim
    assert fmt + qsums <= p.block_bytes <= fmt + qsums + 8 * (4 + 3 * len(p.widths))  # + alignment only
    assert p.block_bytes <= p.page_bytes < p.block_bytes + heads * cfg.residual_length
    # sections are disjoint, in order, and 8-byte aligned
    end = 0
    for s in p.sections.values():
        assert s.offset >= end and s.offset % 8 == 0
        end = s.offset + s.nbytes
    assert end <= p.block_bytes


def test_page_is_over_4x_smaller_than_bf16():
    p = PageLayout(MixKVQConfig(), 3, 64)  # SmolLM2-135M
    bf16 = 3 * 128 * 2 * 64 * ITEMSIZE["bfloat16"]
    assert bf16 / p.page_bytes >= 4.0


def test_data_dependent_tier_counts_are_refused():
    with pytest.raises(NotImplementedError, match="fixed page size"):
        PageLayout(MixKVQConfig(tier_mode="rd", rd_bits=3.5), 3, 64)


def test_page_views_round_trip():
    torch = pytest.importorskip("torch")
    p = PageLayout(MixKVQConfig(), 3, 64)
    page = torch.zeros(p.page_bytes, dtype=torch.uint8)
    v = p.views(page)
    v["qsum"].fill_(7)
    v["k2.scale"].fill_(1.5)
    assert int(p.views(page)["qsum"].sum()) == 7 * 3 * 64
    assert float(p.views(page)["k2.scale"][0, 0]) == 1.5


# -- the engine ------------------------------------------------------------------------------------------
LENGTHS = [60, 200, 300, 520]  # below one block, across one, two and four block boundaries
NEW = 64


@pytest.fixture(scope="module")
def bench():
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed here")
    from mixkvq.integrations.vllm import bench as b

    if not (b.DEFAULT_MODEL / "config.json").exists():
        missing = f"no model folder at {b.DEFAULT_MODEL}; run bash scripts/vllm_env.sh --model"
        if REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)
    return b


@pytest.fixture(scope="module")
def llm(bench):
    engine = bench.make_llm()
    yield engine
    del engine


@pytest.fixture(scope="module")
def prompts(llm, bench):
    return bench.prompts_from_wiki(llm.get_tokenizer(), LENGTHS)


@pytest.fixture(scope="module")
def vllm_out(llm, bench, prompts):
    outs, _ = bench.vllm_generate(llm, prompts, NEW)
    return outs


@needs_vllm
def test_backend_is_mixkvq_not_a_fallback(llm, bench, vllm_out):
    (report,) = bench.worker_reports(llm)
    assert report["impls"] == {"mixkvq.integrations.vllm.backend.MixKVQAttentionImpl": 30}, report
    assert report["stats"]["forwards"] > 0 and report["stats"]["attention_calls"] > 0
    # 0+2+2+4 blocks (prompt + 64 new tokens) in each of 30 layers were packed into pages
    assert report["stats"]["packed_blocks"] >= 30 * 8
    # the engine sized its pages by the MixKVQ page layout (a fallback would size dense K/V)
    cfg = llm.llm_engine.vllm_config.cache_config
    pages = PageLayout(MixKVQConfig(), 3, 64)
    assert cfg.block_size == 128
    assert bench.kv_tokens(llm) == bench.KV_BYTES // (30 * pages.page_bytes) * 128


@needs_vllm
def test_generate_batch_with_prefix_caching(llm, bench, prompts, vllm_out):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    assert [len(o) for o in vllm_out] == [NEW] * len(LENGTHS)
    shared = prompts[3][:400] + prompts[0]  # shares three cached blocks with prompts[3]
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts + [shared]]
    outs = llm.generate(batch, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(t.strip() for t in texts), texts
    before = bench.worker_reports(llm)[0]["stats"]["packed_blocks"]
    # the same batch again is served from the prefix cache (packed pages shared, never rewritten)
    outs2 = llm.generate(batch, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    assert all(o.outputs[0].text.strip() for o in outs2)
    after = bench.worker_reports(llm)[0]["stats"]["packed_blocks"]
    assert after - before < 30 * 4  # most blocks came from the cache, not packed again


@needs_vllm
def test_greedy_agreement_with_mixkvqcache(bench, prompts, vllm_out):
    ref = bench.hf_generate(prompts, NEW)  # transformers + MixKVQCache, packed attention
    agree = bench.agreement(vllm_out, ref)
    assert agree["mean_fraction"] >= 0.75, agree
    assert min(agree["fraction"]) >= 0.5, agree


@needs_vllm
def test_prefix_cache_hit_matches_mixkvqcache_prefilled_in_two_parts(llm, bench):
    """A prefix-cache hit reads the cached prefix packed: like MixKVQCache fed the prefix in
    one forward and the rest of the prompt in a second."""
    p = bench.prompts_from_wiki(llm.get_tokenizer(), [300], start_doc=3)[0]
    bench.vllm_generate(llm, [p], 8)  # fills the cache: blocks 0-1 packed
    hit, _ = bench.vllm_generate(llm, [p], 32)  # 256 tokens from the cache
    ref = bench.hf_generate([p], 32, prefilled=256)
    agree = bench.agreement(hit, ref)
    assert agree["mean_fraction"] >= 0.75, agree


@needs_vllm
def test_chunked_prefill_attends_the_whole_prompt_exactly(bench):
    """A prompt split into chunks (128-token scheduling budget): the blocks a chunk fills stay
    exact until the prompt is in, so every chunk attends its prompt exactly — greedy tokens as
    MixKVQCache's with the prompt in one forward — and they are packed before the first decode."""
    small = bench.make_llm(max_num_batched_tokens=128, enable_chunked_prefill=True, max_num_seqs=4)
    try:
        prompts = bench.prompts_from_wiki(small.get_tokenizer(), [520, 300], start_doc=5)
        before = bench.worker_reports(small)[0]["stats"]
        outs, _ = bench.vllm_generate(small, prompts, 32)
        after = bench.worker_reports(small)[0]["stats"]
        agree = bench.agreement(outs, bench.hf_generate(prompts, 32))
        assert agree["mean_fraction"] >= 0.75, agree
        # 4 + 2 prompt blocks (+ none filled by the 32 new tokens) in each of 30 layers
        assert after["packed_blocks"] - before["packed_blocks"] == 30 * 6, (before, after)
        # every chunk of both prompts (820 tokens: at least 7 chunks) attended exactly, and every
        # prompt block packed by the deferred path (before a decode step attends), not after one
        chunks = after["prompt_chunks"] - before["prompt_chunks"]
        assert chunks >= 30 * 7 and after["exact_prefills"] - before["exact_prefills"] == chunks, (before, after)
        assert after["deferred_packed"] - before["deferred_packed"] == 30 * 6, (before, after)
    finally:
        del small


@needs_vllm
def test_capacity_at_least_4x_the_bf16_cache(llm, bench):
    ours = bench.kv_tokens(llm)
    stock = bench.stock_in_subprocess("capacity", dtype="bfloat16")
    assert not any("MixKVQ" in k for k in stock["reports"][0]["impls"]), stock["reports"]
    assert ours >= 4 * stock["kv_tokens"], (ours, stock["kv_tokens"])


@needs_vllm
def test_preemption_under_a_tiny_kv_budget(bench):
    """12 pages for 4 requests that need 16: vLLM preempts (recompute) and reuses freed pages;
    every request still gets its tokens and the residual bookkeeping holds."""
    pages = PageLayout(MixKVQConfig(), 3, 64)
    small = bench.make_llm(kv_bytes=12 * 30 * pages.page_bytes, max_model_len=1024, disable_log_stats=False)
    try:
        assert bench.kv_tokens(small) == 12 * 128
        prompts = bench.prompts_from_wiki(small.get_tokenizer(), [300, 280, 260, 240], start_doc=11)
        outs, _ = bench.vllm_generate(small, prompts, 100)
        assert [len(o) for o in outs] == [100] * 4
        preempted = [m for m in small.get_metrics() if m.name == "vllm:num_preemptions"]
        assert preempted and sum(m.value for m in preempted) > 0, preempted  # it really preempted
        (report,) = bench.worker_reports(small)
        assert report["impls"] == {"mixkvq.integrations.vllm.backend.MixKVQAttentionImpl": 30}
    finally:
        del small
