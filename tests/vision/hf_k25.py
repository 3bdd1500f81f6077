"""Test helper: a copy of a k2ray K2.5 checkpoint (released layout) converted to what transformers' ``kimi_k25``
reads, and the transformers model loaded from it.

What differs (the issue's list): transformers reads unprefixed vision keys (``hidden_size``, not ``vt_hidden_size``)
and keeps the projector's at the top level; defaults ``tie_word_embeddings`` to true; wants the text config as
``deepseek_v3``; names ``vision_tower.layers.N`` (``norm1/norm2``, split ``q/k/v_proj`` with q and k rows of each head
reordered for its rotate-half rope pairing, ``attn.proj``, ``mlp.fc1/fc2``), ``mm_projector.in_proj/out_proj``,
``model.language_model.*``, fused ``experts.gate_up_proj/down_proj``; and ``image_token_id`` for the placeholder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2ray.checkpoint.index import CheckpointIndex
from k2ray.checkpoint.loader import WeightLoader
from k2ray.config import ModelArgs


def _rope_pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from interleaved pairs (2j, 2j+1) to halves (j, j + Dh/2)."""
    d = w.shape[0]
    dh = d // heads
    return w.reshape(heads, dh // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(d, *w.shape[1:])


def convert_vision(index: CheckpointIndex, heads: int, layers: int) -> dict[str, torch.Tensor]:
    g = lambda n: index.get(n).float()  # noqa: E731
    out = {
        "model.vision_tower.patch_embed.proj.weight": g("vision_tower.patch_embed.proj.weight"),
        "model.vision_tower.patch_embed.proj.bias": g("vision_tower.patch_embed.proj.bias"),
        "model.vision_tower.patch_embed.pos_emb.position_embeddings": g("vision_tower.patch_embed.pos_emb.weight"),
        "model.vision_tower.final_layernorm.weight": g("vision_tower.encoder.final_layernorm.weight"),
        "model.vision_tower.final_layernorm.bias": g("vision_tower.encoder.final_layernorm.bias"),
        "model.mm_projector.pre_norm.weight": g("mm_projector.pre_norm.weight"),
        "model.mm_projector.pre_norm.bias": g("mm_projector.pre_norm.bias"),
        "model.mm_projector.in_proj.weight": g("mm_projector.proj.0.weight"),
        "model.mm_projector.in_proj.bias": g("mm_projector.proj.0.bias"),
        "model.mm_projector.out_proj.weight": g("mm_projector.proj.2.weight"),
        "model.mm_projector.out_proj.bias": g("mm_projector.proj.2.bias"),
    }
    for n in range(layers):
        src, dst = f"vision_tower.encoder.blocks.{n}", f"model.vision_tower.layers.{n}"
        for a, b in (("norm0", "norm1"), ("norm1", "norm2"), ("wo", "attn.proj"), ("mlp.fc0", "mlp.fc1"),
                     ("mlp.fc1", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{dst}.{b}.{p}"] = g(f"{src}.{a}.{p}")
        for p in ("weight", "bias"):
            q, k, v = g(f"{src}.wqkv.{p}").chunk(3)
            out[f"{dst}.attn.q_proj.{p}"] = _rope_pairs_to_halves(q, heads)
            out[f"{dst}.attn.k_proj.{p}"] = _rope_pairs_to_halves(k, heads)
            out[f"{dst}.attn.v_proj.{p}"] = v
    return out


def convert_text(model_dir: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    index = CheckpointIndex(model_dir)
    loader = WeightLoader(model_dir, args, torch.float32)
    out = {}
    for name in index.names():
        if not name.startswith("language_model.") or ".mlp.experts." in name:
            continue
        short = name.removeprefix("language_model.")
        key = "lm_head.weight" if short == "lm_head.weight" else "model.language_model." + short.removeprefix("model.")
        out[key] = index.get(name).float()
    for layer in args.moe_layers:
        w13, w2 = loader.load_experts(layer, range(args.n_routed_experts))
        out[f"model.language_model.layers.{layer}.mlp.experts.gate_up_proj"] = w13
        out[f"model.language_model.layers.{layer}.mlp.experts.down_proj"] = w2
    return out


def convert_config(cfg: dict) -> dict:
    vc = cfg["vision_config"]
    text = dict(cfg["text_config"])
    text.pop("quantization_config", None)
    text["model_type"] = "deepseek_v3"
    return {
        "model_type": "kimi_k25",
        "architectures": ["Kimi_K25ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {
            "hidden_size": vc["vt_hidden_size"], "num_hidden_layers": vc["vt_num_hidden_layers"],
            "num_attention_heads": vc["vt_num_attention_heads"], "intermediate_size": vc["vt_intermediate_size"],
            "patch_size": vc["patch_size"], "pos_emb_height": vc["init_pos_emb_height"],
            "pos_emb_width": vc["init_pos_emb_width"], "pos_emb_time": vc["init_pos_emb_time"],
            "merge_kernel_size": vc["merge_kernel_size"],
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
        "projection_hidden_size": vc["mm_hidden_size"],
        "projection_layer_norm_eps": vc["projector_ln_eps"],
        "image_token_id": cfg["media_placeholder_token_id"],
        "tie_word_embeddings": False,  # the release's value; transformers' default is true
    }


def convert_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    args = ModelArgs.from_dict(cfg)
    v = args.vision
    tensors = convert_text(model_dir, args)
    tensors.update(convert_vision(CheckpointIndex(model_dir), v.num_attention_heads, v.num_hidden_layers))
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(convert_config(cfg), indent=2))
    return out


def load_hf_k25(converted_dir: str | Path):
    from transformers import Kimi_K25ForConditionalGeneration

    model, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        str(converted_dir), dtype=torch.float32, output_loading_info=True)
    missing = [m for m in info["missing_keys"] if "rotary" not in m and "inv_freq" not in m]
    assert not missing and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    return model.eval()
