"""Kimi K2.5's config parsing (both key spellings), the tiny K2.5 checkpoint, and MoonViT + projector against
transformers' ``kimi_k25`` on the same weights."""

import json

import pytest
import torch

from k2ray.checkpoint.loader import load_model, load_vision_encoder
from k2ray.checkpoint.tiny import tiny_k25_config
from k2ray.config import ConfigError, ModelArgs

from .hf_k25 import convert_config


def test_both_vision_key_spellings_parse_alike():
    released = tiny_k25_config()
    hf = convert_config(released)
    a, b = ModelArgs.from_dict(released), ModelArgs.from_dict(hf)
    assert a.vision == b.vision
    assert a.vision.hidden_size == 64 and a.vision.num_hidden_layers == 2 and a.vision.pos_emb_height == 8
    assert a.vision.text_hidden_size == a.hidden_size == 256
    assert a.media_placeholder_token_id == b.media_placeholder_token_id == 2048 + 21
    assert a.tensor_prefix == "language_model." and not a.tie_word_embeddings


@pytest.mark.parametrize("key,value", [
    ("merge_type", "avg"), ("pos_emb_type", "learned"), ("mm_projector_type", "mlp"),
    ("projector_hidden_act", "relu"), ("video_attn_type", "full"),
])
def test_unsupported_vision_value_names_the_key(key, value):
    cfg = tiny_k25_config()
    cfg["vision_config"][key] = value
    with pytest.raises(ConfigError, match=f"vision_config.{key}"):
        ModelArgs.from_dict(cfg)


def test_unknown_vision_key_is_named():
    cfg = tiny_k25_config()
    cfg["vision_config"]["vt_hiden_size"] = 3
    with pytest.raises(ConfigError, match="vt_hiden_size"):
        ModelArgs.from_dict(cfg)


def test_make_tiny_k25_writes_the_released_layout(k25_dir):
    cfg = json.loads((k25_dir / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k25" and cfg["text_config"]["model_type"] == "kimi_k2"
    assert cfg["vision_config"]["vt_hidden_size"] == 64 and cfg["tie_word_embeddings"] is False
    names = json.loads((k25_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for n in ("vision_tower.patch_embed.proj.weight", "vision_tower.patch_embed.pos_emb.weight",
              "vision_tower.encoder.blocks.1.wqkv.bias", "vision_tower.encoder.blocks.0.norm0.weight",
              "vision_tower.encoder.blocks.0.mlp.fc1.weight", "vision_tower.encoder.final_layernorm.weight",
              "mm_projector.pre_norm.weight", "mm_projector.proj.0.weight", "mm_projector.proj.2.weight",
              "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
              "language_model.model.layers.1.mlp.experts.3.gate_proj.weight_packed"):
        assert n in names, n
    assert "<|media_pad|>" in (k25_dir / "chat_template.jinja").read_text()
    assert json.loads((k25_dir / "preprocessor_config.json").read_text())["media_proc_cfg"]["patch_size"] == 14


def test_text_side_never_reads_vision_tensors(k25_dir, monkeypatch):
    from k2ray.checkpoint.index import CheckpointIndex

    read = []
    orig = CheckpointIndex.get
    monkeypatch.setattr(CheckpointIndex, "get", lambda self, n: (read.append(n), orig(self, n))[1])
    load_model(k25_dir, with_experts=False)
    assert read and not [n for n in read if not n.startswith("language_model.")]
    read.clear()
    load_vision_encoder(k25_dir)
    assert read and all(n.startswith(("vision_tower.", "mm_projector.")) for n in read)


def test_encoder_matches_transformers(k25_dir, hf_k25):
    ours = load_vision_encoder(k25_dir)
    grids = [(4, 6), (8, 8), (10, 4), (2, 2)]  # resized pos-emb grids, the learned grid as is, the smallest
    px = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(px, grids)
        ref = hf_k25.model.get_image_features(px, torch.tensor([[1, h, w] for h, w in grids])).pooler_output
    assert [g.shape for g in got] == [r.shape for r in ref] == [(h * w // 4, 256) for h, w in grids]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        assert r.std() > 0.1


def test_released_k25_config_parses():
    """The released Kimi-K2.5 vision_config (issue #23's numbers) and its top-level keys."""
    cfg = tiny_k25_config()
    cfg["text_config"].update(hidden_size=7168, vocab_size=163840)
    cfg["vision_config"] = {
        "vt_hidden_size": 1152, "vt_num_hidden_layers": 27, "vt_num_attention_heads": 16,
        "vt_intermediate_size": 4304, "patch_size": 14, "init_pos_emb_height": 64, "init_pos_emb_width": 64,
        "init_pos_emb_time": 4, "pos_emb_type": "divided_fixed", "merge_kernel_size": [2, 2],
        "merge_type": "sd2_tpool", "mm_projector_type": "patchmerger", "mm_hidden_size": 1152,
        "text_hidden_size": 7168, "projector_ln_eps": 1e-5, "projector_hidden_act": "gelu",
        "video_attn_type": "spatial_temporal",
    }
    cfg.update(media_placeholder_token_id=163605, use_unified_vision_chunk=True, video_placeholder="<|kimi_k25_video_placeholder|>")
    a = ModelArgs.from_dict(cfg)
    v = a.vision
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1152, 27, 16, 4304)
    assert (v.head_dim, v.merge_size, v.text_hidden_size, v.pos_emb_height) == (72, 4, 7168, 64)
    assert a.media_placeholder_token_id == 163605
    # a text_hidden_size that does not match the text model is named
    cfg["vision_config"]["text_hidden_size"] = 4096
    with pytest.raises(ConfigError, match="text_hidden_size"):
        ModelArgs.from_dict(cfg)
