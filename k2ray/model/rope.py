"""DeepSeek YaRN rotary embedding on interleaved pairs (HF ``rope_interleave=True``, vLLM ``deepseek_yarn``)."""

from __future__ import annotations

import math

import torch

from k2ray.config import ModelArgs


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rope_dim // 2]`` and the cos/sin scale for the config's rope scaling."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    rs = args.rope_scaling
    if rs is None or rs.factor <= 1:
        return 1.0 / pos_freqs, 1.0
    factor = rs.factor
    if rs.attention_factor is not None:
        attn_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attn_factor = _yarn_mscale(factor, rs.mscale) / _yarn_mscale(factor, rs.mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 on high-frequency dims (keep), 0 on low-frequency dims (interpolate)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


class RotaryEmbedding:
    """Computes cos/sin per position and rotates interleaved pairs ``(x0, x1), (x2, x3), ...``.

    The rotated output is laid out de-interleaved (``[evens', odds']``), as HF does; queries and keys share the layout,
    so their dot products — all attention ever uses — are unchanged.
    """

    def __init__(self, args: ModelArgs, device: torch.device | str = "cpu"):
        inv_freq, self.scale = rope_frequencies(args)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, heads, rope_dim]``; ``cos``/``sin``: ``[N, rope_dim // 2]``."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
