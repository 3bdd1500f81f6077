"""compressed-tensors ``pack-quantized`` INT4 (symmetric, group-wise) — the format of Kimi K2's routed experts.

A quantized linear of logical shape ``[out, in]`` is stored as three tensors:
``weight_packed`` int32 ``[out, in // 8]``, ``weight_scale`` ``[out, in // group]`` and ``weight_shape`` int32 ``[2]``.
Value ``q`` in ``[-8, 7]`` is stored as the nibble ``q + 8``; column ``k`` lives in word ``k // 8`` at bit ``4 * (k % 8)``.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32
PACK_FACTOR = 8  # nibbles per int32 word
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # bit offset of nibble k % 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values ``q`` (any int dtype, values in [-8, 7], shape ``[out, in]``) into int32 words."""
    if q.dim() != 2 or q.shape[1] % PACK_FACTOR:
        raise ValueError(f"pack_int4 needs a 2-D tensor whose last dim is a multiple of 8, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    nibbles = (q.to(torch.int64) + 8).view(q.shape[0], -1, PACK_FACTOR)
    words = (nibbles << _SHIFTS.to(torch.int64)).sum(-1)
    # Reinterpret the unsigned 32-bit pattern as int32 (two's complement), as the checkpoint stores it.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int] | torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[out, in // 8]`` -> int8 ``[out, in]`` with values in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4 expects int32 words, got {packed.dtype}")
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    q = (nibbles.to(torch.int8) - 8).reshape(*packed.shape[:-1], packed.shape[-1] * PACK_FACTOR)
    if shape is not None:
        out, inp = (int(s) for s in shape)
        q = q[..., :out, :inp]
    return q


def quantize_int4(
    weight: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric min-max group quantization (the compressed-tensors ``minmax`` observer).

    Returns ``(q, scale)`` with ``q`` int8 in [-8, 7] and ``scale`` ``[out, in // group_size]`` in ``scale_dtype``;
    ``q`` is rounded against the scale as stored, so dequantizing the stored pair is the checkpoint's exact truth.
    """
    out, inp = weight.shape
    if inp % group_size:
        raise ValueError(f"quantize_int4: input dim {inp} is not a multiple of the group size {group_size}")
    w = weight.float().view(out, inp // group_size, group_size)
    # Symmetric int4 range used by compressed-tensors: scale = max|w| / ((qmax - qmin) / 2) with qmax=7, qmin=-8.
    amax = w.abs().amax(-1).clamp(min=1e-12)
    scale = (amax / 7.5).to(scale_dtype)
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
    return q.view(out, inp), scale


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``weight_packed`` + ``weight_scale`` (+ ``weight_shape``) -> dense ``[out, in]`` weight in ``dtype``."""
    q = unpack_int4(packed, shape)
    out, inp = q.shape[-2:]
    groups = scale.shape[-1]
    if inp % groups:
        raise ValueError(f"dequantize_int4: {inp} input columns do not split into {groups} scale groups")
    w = q.to(torch.float32).view(*q.shape[:-1], groups, inp // groups) * scale.to(torch.float32).unsqueeze(-1)
    return w.view(*q.shape).to(dtype)
