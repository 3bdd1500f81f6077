"""Checkpoint format: INT4 against compressed-tensors, config parsing, selective reads, FP8, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2ray.checkpoint import CheckpointError
from k2ray.checkpoint.index import CheckpointIndex
from k2ray.checkpoint.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from k2ray.checkpoint.loader import WeightLoader, dequantize_fp8_blocks, load_model
from k2ray.checkpoint.tiny import TINY_VISION_CONFIG, tiny_config
from k2ray.config import ConfigError, ModelArgs

# -- INT4 vs the compressed-tensors library ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32), (17, 64), (128, 256)])
def test_pack_unpack_match_compressed_tensors(shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(shape[0]))
    ours = pack_int4(q)
    theirs = pack_to_int32(q, 4)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int4(theirs, shape), q)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size(shape)), q)


def test_quantize_dequantize_match_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    grouped = w.view(64, 4, 32)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    q, our_scale = quantize_int4(w)
    torch.testing.assert_close(our_scale, scale.float())
    theirs_q = quantize(w, scale, zp, args, dtype=torch.int8)
    assert torch.equal(q, theirs_q)
    ours_w = dequantize_int4(pack_int4(q), our_scale, (64, 128))
    theirs_w = dequantize(theirs_q, scale, zp, args, dtype=torch.float32)
    torch.testing.assert_close(ours_w, theirs_w)
    assert (ours_w - w).abs().max() <= our_scale.max() / 2 + 1e-6  # rounding error bounded by half a step


def test_negative_words_roundtrip():
    q = torch.full((1, 8), 7, dtype=torch.int8)  # nibble 0xF in every position -> all bits set -> int32 -1
    assert pack_int4(q).item() == -1
    assert torch.equal(unpack_int4(pack_int4(q)), q)


# -- config parsing ------------------------------------------------------------------------------------------------


def test_config_variants(tmp_path):
    cfg = tiny_config()
    a = ModelArgs.from_dict(cfg)
    assert a.kv_cache_dim == 80 and a.moe_layers == [1, 2, 3] and a.experts_int4
    assert ModelArgs.from_dict({**cfg, "model_type": "deepseek_v3"}).model_type == "deepseek_v3"
    k25 = {"model_type": "kimi_k25", "text_config": {k: v for k, v in cfg.items() if k != "quantization_config"},
           "vision_config": dict(TINY_VISION_CONFIG), "media_placeholder_token_id": 2069,
           "quantization_config": cfg["quantization_config"], "architectures": ["KimiK25ForConditionalGeneration"]}
    b = ModelArgs.from_dict(k25)
    assert b.tensor_prefix == "language_model." and b.experts_int4 and b.hidden_size == a.hidden_size
    assert b.vision is not None and b.media_placeholder_token_id == 2069
    with pytest.raises(ConfigError, match="vision_config.depth"):  # vision keys are checked like the text ones
        ModelArgs.from_dict({**k25, "vision_config": {**TINY_VISION_CONFIG, "depth": 2}})


def test_real_k2_thinking_config_parses():
    """The published K2-Thinking numbers (reference §1) give the documented derived sizes."""
    cfg = tiny_config()
    cfg.update(vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
               num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64, n_routed_experts=384,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               bos_token_id=163584, eos_token_id=163586, pad_token_id=163839)
    a = ModelArgs.from_dict(cfg)
    assert a.kv_cache_dim == 576 and len(a.moe_layers) == 60
    assert a.kv_cache_dim * 2 * 61 / 1024 == pytest.approx(68.6, abs=0.1)  # 70.3 kB (decimal) per token at bf16
    m = 0.1 * 1.0 * torch.log(torch.tensor(64.0)).item() + 1
    assert a.softmax_scale == pytest.approx(192**-0.5 * m * m)


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"hidden_sise": 3}, "unknown field 'hidden_sise'"),
        ({"num_experts_per_tok": 64}, "num_experts_per_tok=64 exceeds n_routed_experts=32"),
        ({"hidden_size": "big"}, "field 'hidden_size'"),
        ({"model_type": "llama"}, "field 'model_type'"),
        ({"quantization_config": {"quant_method": "awq"}}, "unsupported quantization 'awq'"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "format": "marlin-24"}}, "marlin-24"),
    ],
)
def test_config_errors_name_field_and_file(tmp_path, patch, needle):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), **patch}))
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dir(tmp_path)
    assert needle in str(e.value) and str(tmp_path / "config.json") in str(e.value)


# -- selective reads ------------------------------------------------------------------------------------------------


def test_expert_only_load_reads_only_its_tensors(tiny_weights_dir):
    loader = WeightLoader(tiny_weights_dir)
    w13, w2 = loader.load_experts(2, [3, 17])
    assert w13.shape == (2, 256, 256) and w2.shape == (2, 256, 128)
    read = loader.index.tensors_read
    assert len(read) == 2 * 3 * 3  # 2 experts x 3 projections x (packed, scale, shape)
    assert all(n.startswith(("model.layers.2.mlp.experts.3.", "model.layers.2.mlp.experts.17.")) for n in read)


def test_attention_side_load_never_reads_routed_experts(tiny_weights_dir):
    from k2ray.model.model import KimiK2ForCausalLM

    args = ModelArgs.from_dir(tiny_weights_dir)
    loader = WeightLoader(tiny_weights_dir, args)
    loader.load_dense(KimiK2ForCausalLM(args, with_experts=False))
    read = loader.index.tensors_read
    assert read and not any(".mlp.experts." in n for n in read)
    assert len(read) == len([n for n in loader.index.names() if ".mlp.experts." not in n])


def test_checkpoint_layout_is_k2_format(tiny_weights_dir):
    index = json.loads((tiny_weights_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    t = {}
    for shard in set(index["weight_map"].values()):
        t.update(load_file(str(tiny_weights_dir / shard)))
    assert t["model.layers.1.mlp.experts.0.gate_proj.weight_packed"].dtype == torch.int32
    assert t["model.layers.1.mlp.experts.0.gate_proj.weight_packed"].shape == (128, 32)
    assert t["model.layers.1.mlp.experts.0.down_proj.weight_scale"].shape == (256, 4)
    assert t["model.layers.1.mlp.experts.0.down_proj.weight_scale"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.experts.0.down_proj.weight_shape"].tolist() == [256, 128]
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.mlp.gate_proj.weight"].shape == (512, 256)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_packed" not in t


def test_kimi_k25_layout_loads_same_model(tiny_weights_dir, tmp_path):
    """Nested text_config + language_model. tensor prefix: same logits as the flat layout."""
    index = json.loads((tiny_weights_dir / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in set(index["weight_map"].values()):
        tensors = load_file(str(tiny_weights_dir / shard))
        save_file({"language_model." + k: v for k, v in tensors.items()}, str(tmp_path / shard))
    for k, v in index["weight_map"].items():
        new_map["language_model." + k] = v
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": new_map}))
    cfg = json.loads((tiny_weights_dir / "config.json").read_text())
    quant = cfg.pop("quantization_config")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "kimi_k25", "text_config": cfg, "quantization_config": quant})
    )
    ids = torch.arange(10, 30).unsqueeze(0)
    with torch.no_grad():
        a = load_model(tiny_weights_dir).forward_full(ids)
        b = load_model(tmp_path).forward_full(ids)
    assert torch.equal(a, b)


# -- FP8 (K2-Instruct) ------------------------------------------------------------------------------------------------


def test_fp8_block_dequantization(tmp_path):
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    blocks = torch.zeros(3, 2)
    fp8 = torch.empty(300, 200, dtype=torch.float8_e4m3fn)
    for i in range(3):
        for j in range(2):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            blocks[i, j] = tile.abs().max() / 448.0
            fp8[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (tile / blocks[i, j]).to(torch.float8_e4m3fn)
    deq = dequantize_fp8_blocks(fp8, blocks, (128, 128))
    assert (deq - w).abs().max() < 0.1 * w.abs().max()
    # Through the loader: a weight stored as fp8 + weight_scale_inv is dequantized on read.
    cfg = tiny_config()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"x.weight": fp8, "x.weight_scale_inv": blocks}, str(tmp_path / "model.safetensors"))
    got = WeightLoader(tmp_path).read("x.weight", (300, 200))
    torch.testing.assert_close(got, deq)


# -- broken checkpoints -----------------------------------------------------------------------------------------------


@pytest.fixture
def broken(tiny_weights_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_weights_dir, d)
    return d


def test_missing_tensor(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.self_attn.o_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model.layers.2.self_attn.o_proj.weight' is missing"):
        load_model(broken)


def test_wrong_shape_names_tensor_and_shard(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.q_b_proj.weight"
    shard = index["weight_map"][name]
    tensors = load_file(str(broken / shard))
    tensors[name] = tensors[name][:, :64].contiguous()
    save_file(tensors, str(broken / shard))
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    assert name in str(e.value) and shard in str(e.value) and "(192, 64)" in str(e.value)


def test_corrupt_index(broken):
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors index"):
        CheckpointIndex(broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "nope.safetensors"}}))
    with pytest.raises(CheckpointError, match="'nope.safetensors' listed in weight_map does not exist"):
        CheckpointIndex(broken)


def test_corrupt_shard(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    (broken / shard).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=shard):
        load_model(broken)


def test_unsupported_tensor_quantization(broken):
    """An expert weight stored in an unknown quantized dtype (no weight_packed) is refused by name."""
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    base = "model.layers.3.mlp.experts.5.up_proj"
    shard = index["weight_map"][base + ".weight_packed"]
    tensors = load_file(str(broken / shard))
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        del tensors[f"{base}.{suffix}"]
        del index["weight_map"][f"{base}.{suffix}"]
    tensors[base + ".weight"] = torch.zeros(128, 256, dtype=torch.int8)
    index["weight_map"][base + ".weight"] = shard
    save_file(tensors, str(broken / shard))
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{base}.weight.*unsupported quantized format"):
        WeightLoader(broken).load_experts(3, [5])
