"""The demo checkpoint in a form vLLM's CPU build runs, computing the same function: the shared input of
``bench/vs_vllm.py``.

vLLM's CPU build cannot run the demo as shipped: its INT4 MoE kernel needs AMX, and its attention takes head sizes of
64 and up (the demo's query/key heads are 32 + 16 = 48). So the copy
- stores every weight in float32, the INT4 experts dequantized (``weight_packed`` x ``weight_scale`` per group of 32:
  the very values k2ray computes with on CPU), with no ``quantization_config``;
- zero-pads each head's no-position part of the queries and keys from ``qk_nope_head_dim`` 32 to 48 (rows of zeros in
  ``q_b_proj`` and in the key half of ``kv_b_proj``), so q.k is unchanged and heads are 64 wide;
- multiplies the query rows of ``q_b_proj`` by sqrt(64 / 48), because attention scales q.k by 1/sqrt(head size):
  the scores, and so every logit, are those of the original model (up to float32 rounding).

    python bench/vllm_checkpoint.py OUT_DIR [--model k2ray-demo]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import k2ray.checkpoint.tiny as tiny
from k2ray.checkpoint.builtin import resolve_model
from k2ray.checkpoint.int4 import dequantize_int4

PADDED_NOPE = 48  # 48 + the rope part's 16 = 64: a head size vLLM's CPU attention takes
COPIED = ("tiktoken.model", "tokenizer_config.json", "tokenization_kimi.py", "configuration_deepseek.py",
          "chat_template.jinja", "generation_config.json")


def _pad_heads(w: torch.Tensor, heads: int, parts: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of ``w`` are ``heads`` blocks of consecutive parts; each ``(size, pad)`` part gets ``pad`` zero rows."""
    per_head = sum(size for size, _ in parts)
    blocks = w.view(heads, per_head, -1)
    out, start = [], 0
    for size, pad in parts:
        out.append(blocks[:, start:start + size])
        if pad:
            out.append(blocks.new_zeros(heads, pad, blocks.shape[-1]))
        start += size
    return torch.cat(out, dim=1).reshape(-1, w.shape[-1])


def convert(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(resolve_model(str(src))), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    prefix = ""
    if cfg.get("model_type") == "kimi_k25":  # the comparison runs text: the K2.5 checkpoint's text model alone
        cfg = dict(cfg["text_config"], architectures=["DeepseekV3ForCausalLM"],
                   auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
        prefix = "language_model."
    heads, nope, rope, v = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                            cfg["v_head_dim"])
    if nope > PADDED_NOPE:
        raise SystemExit(f"{src}: qk_nope_head_dim={nope} is above {PADDED_NOPE}; nothing to pad")
    pad = PADDED_NOPE - nope
    q_gain = math.sqrt((PADDED_NOPE + rope) / (nope + rope))
    tensors: dict[str, torch.Tensor] = {}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        tensors.update({k.removeprefix(prefix): v for k, v in load_file(src / shard).items() if k.startswith(prefix)})
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            shape = tensors.get(base + ".weight_shape")
            out[base + ".weight"] = dequantize_int4(t, tensors[base + ".weight_scale"], shape, torch.float32)
        elif name.endswith((".weight_scale", ".weight_shape")):
            continue
        elif name.endswith("self_attn.q_b_proj.weight"):
            out[name] = _pad_heads(t.float() * q_gain, heads, [(nope, pad), (rope, 0)])
        elif name.endswith("self_attn.kv_b_proj.weight"):
            out[name] = _pad_heads(t.float(), heads, [(nope, pad), (v, 0)])
        else:
            out[name] = t.float()
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    cfg.pop("quantization_config", None)
    cfg.update(qk_nope_head_dim=PADDED_NOPE, torch_dtype="float32")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in COPIED:
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    if not (dst / "configuration_deepseek.py").is_file():  # K2.5 releases do not ship it; the text config needs it
        shutil.copy(Path(tiny.__file__).parent / "data" / "configuration_deepseek.py", dst / "configuration_deepseek.py")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model", default="k2ray-demo")
    a = ap.parse_args()
    print(f"wrote {convert(a.model, a.out_dir)}")


if __name__ == "__main__":
    main()
