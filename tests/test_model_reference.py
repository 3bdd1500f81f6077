"""k2ray's forward pass against HuggingFace transformers' DeepseekV3 on the same dequantized tiny weights."""

import json

import pytest
import torch

from k2ray.checkpoint.loader import load_model
from k2ray.model.attention_metadata import AttentionMetadata, SeqSlice


def _hf_model(model_dir, ours):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["model_type"] = "deepseek_v3"
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).float().eval()
    sd = {}
    for k, v in ours.state_dict().items():
        k = k.replace("mlp.experts.w13", "mlp.experts.gate_up_proj").replace("mlp.experts.w2", "mlp.experts.down_proj")
        sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing
    return hf


@pytest.fixture(scope="module")
def models(tiny_weights_dir):
    ours = load_model(tiny_weights_dir, dtype=torch.float32)
    return ours, _hf_model(tiny_weights_dir, ours)


def test_logits_match_transformers(models):
    ours, hf = models
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ours.args.vocab_size, (3, 40), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.forward_full(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Not trivially equal: the logits carry signal and the argmax is stable.
    assert ref.std() > 1e-2
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_routing_exercises_many_experts(models):
    ours, _ = models
    ids = torch.arange(0, 200).unsqueeze(0)
    seen = set()
    hooks = [m.gate.register_forward_hook(lambda m, i, o: seen.update(o[0].flatten().tolist())) for m in ours.moe_layers]
    with torch.no_grad():
        ours.forward_full(ids)
    for h in hooks:
        h.remove()
    assert len(seen) == ours.args.n_routed_experts


def _paged_meta(cache_len_before, q_len, block_table, block_size):
    pos = torch.arange(cache_len_before, cache_len_before + q_len)
    slots = block_table[pos // block_size] * block_size + pos % block_size
    return AttentionMetadata(
        seqs=[SeqSlice(q_start=0, q_len=q_len, ctx_len=cache_len_before + q_len, block_table=block_table)],
        slot_mapping=slots,
        block_size=block_size,
    ), pos


def test_paged_decode_equals_full_recomputation(models):
    """Prefill in two chunks then decode token by token through the paged cache (absorbed MLA) == no-cache logits."""
    ours, _ = models
    a = ours.args
    block_size, num_blocks = 4, 16
    caches = [torch.zeros(num_blocks, block_size, a.kv_cache_dim) for _ in range(a.num_hidden_layers)]
    block_table = torch.tensor([7, 2, 9, 0, 5, 11, 3])  # scattered blocks
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, a.vocab_size, (21,), generator=g)
    with torch.no_grad():
        full = ours.forward_full(seq.unsqueeze(0))[0]
        got = []
        done = 0
        for q_len in [9, 5] + [1] * 7:
            meta, pos = _paged_meta(done, q_len, block_table, block_size)
            h = ours(seq[done : done + q_len], pos, meta, caches)
            got.append(ours.compute_logits(h))
            done += q_len
    got = torch.cat(got)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_batched_decode_matches_single(models):
    """Several sequences decoded in one batch give the same logits as each alone."""
    ours, _ = models
    a = ours.args
    bs = 4
    g = torch.Generator().manual_seed(3)
    lens = [3, 8, 13]
    seqs = [torch.randint(0, a.vocab_size, (n + 1,), generator=g) for n in lens]
    caches = [torch.zeros(32, bs, a.kv_cache_dim) for _ in range(a.num_hidden_layers)]
    tables = [torch.tensor([0, 1, 2, 3]), torch.tensor([10, 4, 5]), torch.tensor([6, 7, 8, 9, 11])]
    with torch.no_grad():
        for s, t, n in zip(seqs, tables, lens):
            meta, pos = _paged_meta(0, n, t, bs)
            ours(s[:n], pos, meta, caches)
        slots = torch.stack([t[n // bs] * bs + n % bs for t, n in zip(tables, lens)])
        meta = AttentionMetadata(
            seqs=[SeqSlice(q_start=i, q_len=1, ctx_len=n + 1, block_table=t) for i, (t, n) in enumerate(zip(tables, lens))],
            slot_mapping=slots, block_size=bs,
        )
        batched = ours.compute_logits(ours(torch.stack([s[n] for s, n in zip(seqs, lens)]), torch.tensor(lens), meta, caches))
        for i, s in enumerate(seqs):
            ref = ours.forward_full(s.unsqueeze(0))[0, -1]
            torch.testing.assert_close(batched[i], ref, rtol=1e-4, atol=1e-4)


def test_bf16_forward_close_to_fp32(tiny_weights_dir, models):
    ours32, _ = models
    ours16 = load_model(tiny_weights_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, ours32.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = ours32.forward_full(ids).float()
        b = ours16.forward_full(ids).float()
    assert b.dtype == torch.float32 and ours16.lm_head.weight.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99


def test_int4_packed_experts_match_dequantized(tiny_weights_dir, models):
    """Experts kept INT4-packed (the W4A16 kernel path; its torch twin on CPU) == dequantized experts."""
    ours, _ = models
    packed = load_model(tiny_weights_dir, dtype=torch.float32, experts_int4=True)
    assert packed.model.layers[1].mlp.experts.w13_packed.dtype == torch.int32
    ids = torch.randint(0, ours.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(packed.forward_full(ids), ours.forward_full(ids), rtol=1e-4, atol=1e-4)
