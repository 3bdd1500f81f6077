"""Prompt-chunk MLA (k2ray.model.mla_prefill: the flash kernel and the tiled twin) against the naive reference, the expanded/absorbed cost rule, and
a 16K-token chunked prefill through the offline engine against transformers."""

from __future__ import annotations

import pytest
import torch

from k2ray.checkpoint.tiny import tiny_config
from k2ray.config import ModelArgs
from k2ray.model.attention_metadata import AttentionMetadata, SeqSlice
from k2ray.model.mla import MLAttention, gather_latents
from k2ray.model.mla_prefill import mla_prefill, tile_size, use_absorbed

TINY = ModelArgs.from_dict(tiny_config())


@pytest.fixture(scope="module")
def attn() -> MLAttention:
    torch.manual_seed(0)
    return MLAttention(TINY).eval()


@pytest.fixture
def one_thread():
    """On a loaded 2-core machine a second OpenMP thread waits for a descheduled peer: 6-10x slower prefill measured."""
    from .engine.engine_helpers import one_torch_thread

    with one_torch_thread():
        yield


def _queries(q_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, a = TINY.num_attention_heads, TINY
    return (torch.randn(q_len, h, a.qk_nope_head_dim, generator=g),
            torch.randn(q_len, h, a.qk_rope_head_dim, generator=g))


# (q_len, ctx_len) with tile 16: single tile, exact tile multiples, one past a boundary, chunk shorter than a tile,
# a chunk that starts mid-tile, q_len = 1, a whole prompt (offset 0).
CASES = [(5, 5), (16, 16), (17, 17), (16, 48), (7, 49), (1, 33), (1, 1), (40, 40), (33, 100), (3, 64), (64, 65)]


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("q_len,ctx_len", CASES)
def test_tiled_equals_naive(attn, q_len, ctx_len, absorbed):
    q_nope, q_pe = _queries(q_len, seed=q_len * 1000 + ctx_len)
    lat = torch.randn(ctx_len, TINY.kv_cache_dim, generator=torch.Generator().manual_seed(ctx_len))
    with torch.no_grad():
        ref = attn._prefill(q_nope, q_pe, lat, ctx_len - q_len)
        for tile in (16, 4096):
            got = mla_prefill(q_nope, q_pe, lat, None, ctx_len, attn.kv_b_proj.weight, attn.scale, absorbed, tile,
                              "tiled")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("q_len,ctx_len", CASES + [(300, 20_000), (1, 9000), (8193, 8193)])
def test_flash_equals_naive(attn, q_len, ctx_len, absorbed, monkeypatch):
    """The fused-kernel path == the naive reference, across key-block boundaries (blocks of 16 and the default)."""
    import k2ray.model.mla_prefill as mp

    q_nope, q_pe = _queries(q_len, seed=q_len * 1000 + ctx_len)
    lat = torch.randn(ctx_len, TINY.kv_cache_dim, generator=torch.Generator().manual_seed(ctx_len))
    assert mp.flash_available(q_nope)
    with torch.no_grad():
        ref = attn._prefill(q_nope, q_pe, lat, ctx_len - q_len)
        for key_block in ((16, mp.KEY_BLOCK) if ctx_len < 1000 else (mp.KEY_BLOCK,)):
            monkeypatch.setattr(mp, "KEY_BLOCK", key_block)
            got = mla_prefill(q_nope, q_pe, lat, None, ctx_len, attn.kv_b_proj.weight, attn.scale, absorbed,
                              kernel="flash")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_tiled_reads_the_paged_cache(attn):
    """Latents scattered over cache blocks, read through slots == the same latents contiguous (both kernels)."""
    bs, ctx, q_len = 4, 37, 9
    cache = torch.randn(16, bs, TINY.kv_cache_dim)
    table = torch.tensor([9, 3, 14, 0, 7, 11, 2, 5, 12, 1])
    lat = gather_latents(cache, table, ctx)
    slots = table[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs
    q_nope, q_pe = _queries(q_len, seed=7)
    with torch.no_grad():
        ref = attn._prefill(q_nope, q_pe, lat, ctx - q_len)
        for absorbed in (False, True):
            for kernel in ("tiled", "flash"):
                got = mla_prefill(q_nope, q_pe, cache.view(-1, TINY.kv_cache_dim), slots, ctx,
                                  attn.kv_b_proj.weight, attn.scale, absorbed, tile=8, kernel=kernel)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_attend_chunked_through_cache_equals_naive(attn):
    """MLAttention.attend with prompt chunks of several sizes over a paged cache (both forms get picked) == the
    naive reference on the same latents."""
    bs = 16
    total = 700
    cache = torch.zeros(64, bs, TINY.kv_cache_dim)
    table = torch.randperm(64)[: (total + bs - 1) // bs]
    g = torch.Generator().manual_seed(3)
    done = 0
    picked = set()
    with torch.no_grad():
        for q_len in (300, 8, 1, 256, 135):
            q_nope, q_pe = _queries(q_len, seed=done)
            c_kv = torch.randn(q_len, TINY.kv_lora_rank, generator=g)
            k_pe = torch.randn(q_len, TINY.qk_rope_head_dim, generator=g)
            pos = torch.arange(done, done + q_len)
            meta = AttentionMetadata(
                seqs=[SeqSlice(q_start=0, q_len=q_len, ctx_len=done + q_len, block_table=table)],
                slot_mapping=table[pos // bs] * bs + pos % bs, block_size=bs,
            )
            from k2ray.model.mla import MLAProjection

            got = attn.attend(MLAProjection(q_nope, q_pe, c_kv, k_pe), meta, cache)
            ref_heads = attn._prefill(q_nope, q_pe, gather_latents(cache, table, done + q_len), done)
            ref = attn.o_proj(ref_heads.reshape(q_len, -1))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            a = TINY
            picked.add(use_absorbed(q_len, done + q_len, a.num_attention_heads, a.kv_lora_rank, a.qk_rope_head_dim,
                                    a.qk_nope_head_dim, a.v_head_dim))
            done += q_len
    assert picked == {True, False}


def test_bf16_tiled_close_to_fp32(attn):
    q_len, ctx = 50, 300
    q_nope, q_pe = _queries(q_len, seed=11)
    lat = torch.randn(ctx, TINY.kv_cache_dim, generator=torch.Generator().manual_seed(12))
    w = attn.kv_b_proj.weight
    with torch.no_grad():
        ref = attn._prefill(q_nope, q_pe, lat, ctx - q_len)
        for absorbed in (False, True):
            for kernel in ("tiled", "flash"):
                got = mla_prefill(q_nope.bfloat16(), q_pe.bfloat16(), lat.bfloat16(), None, ctx, w.bfloat16(),
                                  attn.scale, absorbed, tile=64, kernel=kernel)
                assert got.dtype == torch.bfloat16
                cos = torch.nn.functional.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0)
                assert cos > 0.999, (absorbed, kernel)


@pytest.mark.parametrize("args", [TINY, None], ids=["tiny", "k2"])
def test_cost_rule(args):
    """Absorbed for a short chunk over a long cache, expanded for a whole prompt or a long chunk."""
    if args is None:  # Kimi K2's attention shape
        dims = dict(heads=64, kv_lora_rank=512, rope=64, nope=128, v=128)
    else:
        dims = dict(heads=args.num_attention_heads, kv_lora_rank=args.kv_lora_rank, rope=args.qk_rope_head_dim,
                    nope=args.qk_nope_head_dim, v=args.v_head_dim)
    assert use_absorbed(1, 100_000, **dims)
    assert use_absorbed(16, 32_768, **dims)
    assert not use_absorbed(2048, 2048, **dims)  # a full prompt
    assert not use_absorbed(2048, 131_072, **dims)  # a long chunk of a long prompt
    assert not use_absorbed(8192, 8192, **dims)


def test_tile_size_keeps_scores_bounded():
    assert tile_size(4, 1) == 1024
    assert tile_size(4, 2048) == 512
    assert tile_size(64, 8192) == 256
    for h, q in [(4, 1), (4, 100), (4, 2048), (64, 512)]:
        assert 256 <= tile_size(h, q) <= 1024 and tile_size(h, q) % 256 == 0


@pytest.mark.slow
def test_16k_chunked_prefill_greedy_matches_transformers(tiny_model_dir, one_thread):
    """A 16,384-token prompt prefilled in 2,048-token chunks through ``LLM`` (tiled attention over the paged cache)
    continues greedily exactly as transformers' DeepseekV3 (sdpa) on the same weights. About 75 s on a loaded
    2-core machine (~30 s k2ray, the rest transformers)."""
    from k2ray.llm import LLM
    from k2ray.runtime.sampling import SamplingParams

    from .test_model_reference import _hf_model

    n, new = 16_384, 4
    ids = torch.randint(1, 2000, (n,), generator=torch.Generator().manual_seed(21)).tolist()
    llm = LLM(model=tiny_model_dir, dtype="float32", block_size=16, num_kv_blocks=(n + new) // 16 + 2,
              max_num_batched_tokens=2048, enable_prefix_caching=False)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))[0]
    got = out.outputs[0].token_ids

    ours = llm.engine.executor.runner.model
    hf = _hf_model(tiny_model_dir, ours)
    hf.set_attn_implementation("sdpa")
    llm.shutdown()
    # transformers prefills in chunks too (its own latent cache): a whole 16K prompt would make its sdpa fall back to
    # the math kernel with a [heads, 16K, 16K] fp32 score matrix (~11 GB peak measured).
    from transformers import DynamicCache

    x = torch.tensor([ids])
    want = []
    with torch.no_grad():
        cache = DynamicCache(config=hf.config)
        for s in range(0, n, 2048):
            logits = hf(input_ids=x[:, s : s + 2048], cache=cache, use_cache=True, logits_to_keep=1).logits
        for _ in range(new):
            want.append(int(logits[0, -1].argmax()))
            logits = hf(input_ids=torch.tensor([want[-1:]]), cache=cache, use_cache=True).logits
    assert got == want
