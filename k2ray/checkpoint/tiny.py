"""``k2ray make-tiny``: a deterministic random-weight checkpoint in exactly the Kimi K2-Thinking format.

Same tensor names, config keys and quantization block as the real model; INT4 pack-quantized routed experts, bf16
everything else, fp32 ``e_score_correction_bias``; two safetensors shards plus the index; tokenizer files whose 256
special tokens follow a small BPE vocabulary at the K2 offsets.

``--preset k2-mini`` writes the same format at Kimi K2's real layer shapes and vocabulary (163,840 ids) with 3 layers:
the dense one and two MoE layers of 384 INT4 experts plus the shared expert (about 25 GB). Its tensors are cut from
seeded random pools shard by shard as the shards are written (:func:`write_checkpoint_lazily`), so it takes seconds
and one shard of memory, and the same seed gives the same bytes on any machine.

``--format kimi_k25`` writes the Kimi K2.5 layout instead: the same text model nested in ``text_config`` with its
tensors under ``language_model.``, a tiny MoonViT (``vision_tower.*``, ``vision_config`` keys spelled ``vt_*`` as
released) and projector (``mm_projector.*``), ``media_placeholder_token_id`` at the tiny vocabulary's
``<|media_pad|>``, a ``preprocessor_config.json`` and a chat template that renders image parts.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2ray.checkpoint.int4 import pack_int4, quantize_int4

TINY_BASE_VOCAB = 2048  # BPE tokens; the 256 K2 specials follow
QUANTIZATION_CONFIG = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def tiny_config(base_vocab: int = TINY_BASE_VOCAB) -> dict:
    """The DESIGN.md tiny shape with K2-Thinking's rope scaling, routing and special-token layout."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        # As in Kimi's K2 releases: transformers does not know model_type kimi_k2; the checkpoint's own
        # configuration_deepseek.py (written beside config.json) declares it.
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "model_type": "kimi_k2",
        "vocab_size": base_vocab + 256,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 32,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "ep_size": 1,
        "num_nextn_predict_layers": 0,
        "seq_aux": True,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": base_vocab,
        "eos_token_id": base_vocab + 2,  # <|im_end|>, as K2-Thinking
        "pad_token_id": base_vocab + 255,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.56.2",
        "quantization_config": QUANTIZATION_CONFIG,
    }


def random_state_dict(args, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic random fp32 weights for every tensor of the model (experts as stacked w13/w2)."""
    from k2ray.model.model import KimiK2ForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = KimiK2ForCausalLM(args)
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight") or "layernorm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            sd[name] = 0.01 * torch.randn(t.shape, generator=g)
        else:
            sd[name] = std * torch.randn(t.shape, generator=g)
    return sd


def write_checkpoint(out_dir: str | Path, config: dict, state: dict[str, torch.Tensor], num_shards: int = 2,
                     extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``state`` (model-format names, experts stacked as ``experts.w13/w2``) as a K2-format checkpoint; the
    text tensors get the config's prefix (``language_model.`` for kimi_k25). ``extra`` tensors (the image encoder's)
    are written as given, in bf16."""
    from k2ray.config import ModelArgs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    prefix = args.tensor_prefix
    i_dim = args.moe_intermediate_size
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.w13") or name.endswith(".mlp.experts.w2"):
            continue
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        tensors[prefix + name] = t.detach().to(dtype).contiguous()
    for name, t in (extra or {}).items():
        tensors[name] = t.detach().to(torch.bfloat16).contiguous()
    for layer in args.moe_layers:
        w13 = state[f"model.layers.{layer}.mlp.experts.w13"]
        w2 = state[f"model.layers.{layer}.mlp.experts.w2"]
        for e in range(args.n_routed_experts):
            parts = {"gate_proj": w13[e, :i_dim], "up_proj": w13[e, i_dim:], "down_proj": w2[e]}
            for proj, w in parts.items():
                q, scale = quantize_int4(w.detach().float(), scale_dtype=torch.bfloat16)
                base = f"{prefix}model.layers.{layer}.mlp.experts.{e}.{proj}"
                tensors[base + ".weight_packed"] = pack_int4(q)
                tensors[base + ".weight_scale"] = scale.contiguous()
                tensors[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
    # Split by layer so that each shard holds whole layers, as real releases do.
    names = sorted(tensors, key=_layer_key)
    per = -(-len(names) // num_shards)
    weight_map = {}
    for s in range(num_shards):
        shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[s * per : (s + 1) * per]
        save_file({n: tensors[n] for n in chunk}, str(out / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_metadata(out, config, weight_map, total)


def _write_metadata(out: Path, config: dict, weight_map: dict[str, str], total: int) -> None:
    """The index, config.json and generation_config.json beside the shards."""
    from k2ray.config import ModelArgs

    args = ModelArgs.from_dict(config)  # the token ids live in text_config for the K2.5 layout
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for module in set((config.get("auto_map") or {}).values()):  # the configuration class config.json names
        name = module.split(".")[0] + ".py"
        shutil.copyfile(Path(__file__).parent / "data" / name, out / name)
    gen = {
        "bos_token_id": args.bos_token_id,
        "eos_token_id": [args.bos_token_id + 1, args.bos_token_id + 2],
        "pad_token_id": args.pad_token_id,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _layer_key(name: str) -> tuple[int, str]:
    if name.startswith(("vision_tower.", "mm_projector.")):
        return (-2, name)
    name = name.removeprefix("language_model.")
    if name.startswith("model.embed_tokens"):
        return (-1, name)
    if name.startswith("model.layers."):
        return (int(name.split(".")[2]), name)
    return (10**9, name)


TINY_VISION_CONFIG = {
    # The released vision_config keys (vt_ prefix), tiny sizes.
    "vt_hidden_size": 64,
    "vt_num_hidden_layers": 2,
    "vt_num_attention_heads": 4,
    "vt_intermediate_size": 128,
    "patch_size": 14,
    "init_pos_emb_height": 8,
    "init_pos_emb_width": 8,
    "init_pos_emb_time": 4,
    "pos_emb_type": "divided_fixed",
    "merge_kernel_size": [2, 2],
    "merge_type": "sd2_tpool",
    "mm_projector_type": "patchmerger",
    "mm_hidden_size": 64,
    "text_hidden_size": 256,
    "projector_ln_eps": 1e-5,
    "projector_hidden_act": "gelu",
    "video_attn_type": "spatial_temporal",
}
# The released media_proc_cfg with tiny limits, so that the resize path is reached by small images.
TINY_MEDIA_PROC_CFG = {
    "in_patch_limit": 256,
    "patch_size": 14,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "merge_kernel_size": 2,
    "patch_limit_on_one_side": 32,
}


def tiny_k25_config(base_vocab: int = TINY_BASE_VOCAB) -> dict:
    """The tiny text model nested as Kimi K2.5 releases it, with a tiny MoonViT."""
    text = dict(tiny_config(base_vocab))
    quant = text.pop("quantization_config")
    for k in ("architectures", "auto_map", "transformers_version", "torch_dtype"):
        text.pop(k)
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": dict(TINY_VISION_CONFIG),
        "media_placeholder_token_id": base_vocab + 21,  # <|media_pad|> (163605 in the real vocabulary)
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.56.2",
        "quantization_config": quant,
    }


def random_vision_state_dict(vision_args, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic random fp32 weights of the image encoder, under the released names."""
    from k2ray.model.vision import KimiVisionEncoder

    g = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    for name, t in KimiVisionEncoder(vision_args).state_dict().items():
        if "norm" in name and name.endswith(".weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("pos_emb.weight"):
            sd[name] = 0.5 * torch.randn(t.shape, generator=g)
        elif name.endswith(".bias"):
            sd[name] = 0.05 * torch.randn(t.shape, generator=g)
        else:
            fan_in = t[0].numel()
            sd[name] = fan_in**-0.5 * torch.randn(t.shape, generator=g)
    return sd


def make_tiny(out_dir: str | Path, seed: int = 0, format: str = "kimi_k2") -> Path:
    """Write the random-weight tiny checkpoint (deterministic for a given seed) and return its path. ``format``:
    ``kimi_k2`` (K2-Thinking layout) or ``kimi_k25`` (K2.5 layout, with the image encoder)."""
    from k2ray.config import ModelArgs
    from k2ray.tokenizer.tiny import write_k25_files, write_tokenizer_files

    if format not in ("kimi_k2", "kimi_k25"):
        raise ValueError(f"format: unknown checkpoint format {format!r} (kimi_k2 or kimi_k25)")
    config = tiny_config() if format == "kimi_k2" else tiny_k25_config()
    args = ModelArgs.from_dict(config)
    extra = random_vision_state_dict(args.vision, seed) if args.vision is not None else None
    write_checkpoint(out_dir, config, random_state_dict(args, seed), extra=extra)
    write_tokenizer_files(out_dir)
    if format == "kimi_k25":
        write_k25_files(out_dir)
        (Path(out_dir) / "preprocessor_config.json").write_text(
            json.dumps({"media_proc_cfg": TINY_MEDIA_PROC_CFG}, indent=2) + "\n")
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------------------------
# k2-mini: real Kimi K2 layer shapes and vocabulary, 3 layers (the dense one + 2 MoE layers of 384 INT4 experts)

K2_BASE_VOCAB = 163_584  # K2's BPE tokens; its 256 specials follow (vocab_size 163,840)
K2_DIMS = {
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}
PRESETS = ("tiny", "k2-mini")


def k2_mini_config(overrides: dict | None = None) -> dict:
    """K2-Thinking's config with 3 layers (layer 0 dense, layers 1-2 MoE); ``overrides`` replace keys (tests and the
    GPU campaign's dry run shrink the dims, keeping the vocabulary)."""
    config = tiny_config(K2_BASE_VOCAB)
    config.update(K2_DIMS, num_hidden_layers=3)
    config.update(overrides or {})
    return config


class _Pools:
    """Deterministic random pools; a tensor is cut from a pool as one window per row (row ``r`` starts at
    ``(crc32(name) + r * 7919) mod span``), so writing tens of GB costs one gather per tensor, not a random draw per
    value. Rows differ from each other, and the content does not depend on the machine (CPU generator)."""

    SIZE = 1 << 22
    STEP = 7919

    def __init__(self, seed: int, expert_std: float = 0.02):
        g = torch.Generator().manual_seed(seed)
        normal = torch.randn(self.SIZE, generator=g)
        self.bf16 = {
            "normal": (0.02 * normal).to(torch.bfloat16),
            "norm": (1.0 + 0.1 * normal).to(torch.bfloat16),
        }
        self.fp32_small = 0.01 * normal
        self.words = torch.randint(-(2**31), 2**31 - 1, (self.SIZE,), dtype=torch.int32, generator=g)
        # INT4 nibbles are uniform in -8..7 (std ~4.6): scales around expert_std / 4.6 give weights of ~expert_std.
        base = expert_std / 4.6
        self.bf16["scale"] = (base * (0.5 + torch.rand(self.SIZE, generator=g))).to(torch.bfloat16)

    def cut(self, pool: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        cols = shape[-1]
        rows = 1
        for d in shape[:-1]:
            rows *= d
        span = pool.numel() - cols + 1
        if span < 1:
            raise ValueError(f"{name}: rows of {cols} values exceed the pool")
        start = zlib.crc32(name.encode())
        offsets = (start + torch.arange(rows, dtype=torch.int64) * self.STEP) % span
        return pool.unfold(0, cols, 1).index_select(0, offsets).view(shape)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The checkpoint tensor ``name`` (dtype and distribution from its name, as :func:`write_checkpoint`)."""
        if name.endswith(".weight_packed"):
            return self.cut(self.words, name, shape)
        if name.endswith(".weight_scale"):
            return self.cut(self.bf16["scale"], name, shape)
        if name.endswith("e_score_correction_bias"):
            return self.cut(self.fp32_small, name, shape)
        if name.endswith("norm.weight") or "layernorm" in name:
            return self.cut(self.bf16["norm"], name, shape)
        return self.cut(self.bf16["normal"], name, shape)


def _k2_specs(args) -> list[tuple[str, tuple[int, ...], torch.dtype, tuple[int, int] | None]]:
    """Every tensor of a K2-format checkpoint of ``args`` in file order: (name, shape, dtype, the logical
    ``[out, in]`` of a ``weight_shape`` tensor or None)."""
    from k2ray.model.model import KimiK2ForCausalLM

    with torch.device("meta"):
        model = KimiK2ForCausalLM(args, with_experts=False)
    specs = []
    for name, t in model.state_dict().items():
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        specs.append((name, tuple(t.shape), dtype, None))
    h, i, g = args.hidden_size, args.moe_intermediate_size, 32
    for layer in args.moe_layers:
        for e in range(args.n_routed_experts):
            for proj, (out, inp) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                base = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                specs += [(base + ".weight_packed", (out, inp // 8), torch.int32, None),
                          (base + ".weight_scale", (out, inp // g), torch.bfloat16, None),
                          (base + ".weight_shape", (2,), torch.int32, (out, inp))]
    return sorted(specs, key=lambda s: _layer_key(s[0]))


def write_checkpoint_lazily(out_dir: str | Path, config: dict, seed: int = 0,
                            shard_bytes: int = 2 * 2**30) -> Path:
    """A K2-format checkpoint of ``config`` whose tensors are made shard by shard as they are written (memory: one
    shard), cut from :class:`_Pools`; deterministic for a seed. Same names, dtypes and index as
    :func:`write_checkpoint`."""
    from k2ray.config import ModelArgs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    specs = _k2_specs(args)
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    pools = _Pools(seed)
    weight_map, total = {}, 0
    for s, chunk in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tname, shape, _, logical in chunk:
            if logical is not None:
                tensors[tname] = torch.tensor(list(logical), dtype=torch.int32)
            else:
                tensors[tname] = pools.tensor(tname, shape)
            total += tensors[tname].numel() * tensors[tname].element_size()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        del tensors
    _write_metadata(out, config, weight_map, total)
    return out


def make_preset(out_dir: str | Path, preset: str = "tiny", seed: int = 0, overrides: dict | None = None) -> Path:
    """``k2ray make-tiny --preset``: ``tiny`` (:func:`make_tiny`) or ``k2-mini`` (real K2 layer shapes and
    vocabulary, 3 layers, 384 INT4 experts per MoE layer: about 25 GB, written lazily)."""
    from k2ray.tokenizer.tiny import write_tokenizer_files

    if preset == "tiny":
        if overrides:
            raise ValueError("the tiny preset takes no overrides")
        return make_tiny(out_dir, seed=seed)
    if preset != "k2-mini":
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    config = k2_mini_config(overrides)
    write_checkpoint_lazily(out_dir, config, seed=seed)
    write_tokenizer_files(out_dir, base_vocab=config["vocab_size"] - 256)
    return Path(out_dir)
