"""`k2ray make-tiny --preset k2-mini`: Kimi K2's real layer shapes and vocabulary, 3 layers, written lazily (#26)."""

from __future__ import annotations

import hashlib
import json

import torch

from k2ray.checkpoint.tiny import K2_DIMS, _k2_specs, _Pools, k2_mini_config, make_preset
from k2ray.config import ModelArgs

# The GPU campaign's dry-run dims: the layout and the vocabulary stay K2's.
SMALL = {
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_attention_heads": 2,
    "num_key_value_heads": 2, "n_routed_experts": 8, "q_lora_rank": 64, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
}


def test_k2_mini_config_is_k2_with_three_layers():
    cfg = k2_mini_config()
    args = ModelArgs.from_dict(cfg)
    assert {k: cfg[k] for k in K2_DIMS} == K2_DIMS
    assert args.vocab_size == 163_840 and args.num_hidden_layers == 3
    assert args.moe_layers == [1, 2] and args.n_routed_experts == 384 and args.num_experts_per_tok == 8
    assert args.experts_int4 and args.kv_cache_dim == 576
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (163_584, 163_586, 163_839)


def test_k2_mini_layout_at_full_size():
    """The tensor list at real dims (nothing written): 384 INT4 experts per MoE layer, ~25 GB in all."""
    specs = _k2_specs(ModelArgs.from_dict(k2_mini_config()))
    names = {n: (shape, dtype) for n, shape, dtype, _ in specs}
    assert names["model.layers.1.mlp.experts.383.down_proj.weight_packed"] == ((7168, 256), torch.int32)
    assert names["model.layers.2.mlp.experts.0.gate_proj.weight_scale"] == ((2048, 224), torch.bfloat16)
    assert names["model.layers.0.mlp.down_proj.weight"] == ((7168, 18432), torch.bfloat16)
    assert names["model.layers.1.mlp.gate.e_score_correction_bias"] == ((384,), torch.float32)
    assert names["lm_head.weight"] == ((163_840, 7168), torch.bfloat16)
    assert sum(".experts." in n and n.endswith("weight_packed") for n in names) == 2 * 384 * 3
    total = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in names.values())
    assert 24e9 < total < 27e9


def test_pools_rows_differ():
    pools = _Pools(0)
    w = pools.tensor("lm_head.weight", (1000, 64))
    assert w.dtype == torch.bfloat16 and torch.unique(w, dim=0).shape[0] == 1000
    assert torch.equal(w, _Pools(0).tensor("lm_head.weight", (1000, 64)))
    packed = pools.tensor("model.layers.1.mlp.experts.3.up_proj.weight_packed", (16, 8))
    assert packed.dtype == torch.int32 and not torch.equal(packed, pools.tensor(
        "model.layers.1.mlp.experts.4.up_proj.weight_packed", (16, 8)))


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_k2_mini_small_dims_deterministic_and_loads(tmp_path):
    from k2ray.checkpoint.loader import load_model
    from k2ray.tokenizer.tokenizer import KimiTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    make_preset(a, "k2-mini", seed=0, overrides=SMALL)
    make_preset(b, "k2-mini", seed=0, overrides=SMALL)
    assert _digest(a) == _digest(b)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and cfg["vocab_size"] == 163_840

    tok = KimiTokenizer.from_dir(a)
    assert tok.vocab_size == 163_840 and tok.n_base_tokens == 163_584
    assert tok.bos_token_id == 163_584 and tok.eos_token_id == 163_586
    assert tok.special_tokens["<think>"] == 163_584 + 22
    assert tok.special_tokens["<|reserved_token_163589|>"] == 163_589  # unnamed specials carry their new id
    assert "<|reserved_token_2053|>" not in tok.special_tokens
    assert all(i < 2048 for i in tok.encode("Hello <k2-filler-004000> world"))
    assert tok.decode([100_000]) == "<k2-filler-100000>"

    model = load_model(a, dtype=torch.float32, experts_int4=True)
    assert model.model.layers[1].mlp.experts.w13_packed.shape == (8, 128, 16)
    with torch.no_grad():
        logits = model.forward_full(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 163_840) and torch.isfinite(logits).all()


def test_cli_preset_argument():
    from k2ray.cli import build_parser

    args = build_parser().parse_args(["make-tiny", "out", "--preset", "k2-mini"])
    assert args.preset == "k2-mini"
    assert build_parser().parse_args(["make-tiny", "out"]).preset == "tiny"
