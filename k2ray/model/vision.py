"""Kimi K2.5's image encoder: MoonViT and the patch-merger projector. Module names follow the released checkpoint
(``vision_tower.encoder.blocks.N.wqkv``, ``mm_projector.proj.0``, ...).

Shapes: ``N`` patches of all images packed together (image after image, each in raster order of its patch grid),
``D`` the tower's width, ``Hh`` heads of ``Dh`` dims, ``T`` the text model's hidden size. An image of ``h x w``
patches (both even: the preprocessor pads) becomes ``h/2 * w/2`` text-model embeddings.

Per image::

    patches [h*w, 3, 14, 14] --Conv2d--> [h*w, D] + learned grid (bicubically resized to h x w)
    -> blocks: x + wo(attn(norm0(x))), x + fc1(gelu_tanh(fc0(norm1(x))))   attention within the image only,
       q and k rotated by 2-D rope (pairs alternate: column position, row position)
    -> final_layernorm -> 2x2 cells, patches of a cell in raster order [h/2*w/2, 4, D]
    -> pre_norm (per patch) -> [h/2*w/2, 4D] -> proj.0 -> GELU -> proj.2 -> [h/2*w/2, T]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2ray.config import VisionArgs

Grid = tuple[int, int]  # (h, w): an image's patch grid


class LearnedGridPosEmb(nn.Module):
    """A learned ``[H0, W0, D]`` grid, bicubically resampled to each image's grid (as ``F.interpolate``,
    ``align_corners=False``); an image whose grid is ``H0 x W0`` takes it as is."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(height, width, dim))

    def forward(self, grids: list[Grid]) -> torch.Tensor:
        out = []
        for h, w in grids:
            if (h, w) == tuple(self.weight.shape[:2]):
                out.append(self.weight.flatten(0, 1))
                continue
            table = self.weight.permute(2, 0, 1).unsqueeze(0)  # [1, D, H0, W0]
            resized = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)  # [1, D, h, w]
            out.append(resized[0].permute(1, 2, 0).flatten(0, 1))  # [h*w, D]
        return torch.cat(out)  # [N, D]


class PatchEmbed(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.proj = nn.Conv2d(3, a.hidden_size, kernel_size=a.patch_size, stride=a.patch_size)
        self.pos_emb = LearnedGridPosEmb(a.pos_emb_height, a.pos_emb_width, a.hidden_size)

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        x = self.proj(pixels).flatten(1)  # [N, 3, p, p] -> [N, D]
        return x + self.pos_emb(grids).to(x.dtype)


def rope_2d(grids: list[Grid], head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[N, Dh/2]`` (fp32) for the interleaved pairs ``(2j, 2j+1)`` of a head: pair ``j`` turns by
    ``column * f[j // 2]`` when ``j`` is even and ``row * f[j // 2]`` when odd, ``f[k] = theta ** (-4k / Dh)``."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)  # [Dh/4]
    angles = []
    for h, w in grids:
        idx = torch.arange(h * w, device=device)
        col, row = (idx % w).float(), (idx // w).float()
        ang = torch.stack([col[:, None] * freqs, row[:, None] * freqs], dim=-1)  # [h*w, Dh/4, 2]
        angles.append(ang.flatten(1))  # [h*w, Dh/2]: col f0, row f0, col f1, row f1, ...
    a = torch.cat(angles)
    return a.cos(), a.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of ``x [N, Hh, Dh]`` (in fp32)."""
    xf = x.float().unflatten(-1, (-1, 2))  # [N, Hh, Dh/2, 2]
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.num_heads, self.head_dim = a.num_attention_heads, a.head_dim
        self.norm0 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.wqkv = nn.Linear(a.hidden_size, 3 * a.hidden_size)
        self.wo = nn.Linear(a.hidden_size, a.hidden_size)
        self.mlp = VisionMLP(a.hidden_size, a.intermediate_size)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.wqkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, Hh, Dh]
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        out = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):  # each image attends to itself
            o = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
            out.append(o.transpose(0, 1).flatten(1))  # [Hh, n_i, Dh] -> [n_i, D]
        return self.wo(torch.cat(out))

    def forward(self, x, cos, sin, lengths):
        x = x + self.attention(self.norm0(x), cos, sin, lengths)
        return x + self.mlp(self.norm1(x))


class VisionEncoderStack(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.blocks = nn.ModuleList(VisionBlock(a) for _ in range(a.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)


class MoonViT(nn.Module):
    """Patches of several images -> per image ``[h/kh * w/kw, kh*kw, D]`` (the patches of each merge cell)."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.patch_embed = PatchEmbed(a)
        self.encoder = VisionEncoderStack(a)

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> list[torch.Tensor]:
        a = self.args
        lengths = [h * w for h, w in grids]
        x = self.patch_embed(pixels, grids)  # [N, D]
        cos, sin = rope_2d(grids, a.head_dim, a.rope_theta, x.device)
        for block in self.encoder.blocks:
            x = block(x, cos, sin, lengths)
        x = self.encoder.final_layernorm(x)
        kh, kw = a.merge_kernel_size
        cells = []
        for xi, (h, w) in zip(x.split(lengths), grids):
            xi = xi.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)  # [h/kh, w/kw, kh, kw, D]
            cells.append(xi.reshape((h // kh) * (w // kw), kh * kw, -1))
        return cells


class PatchMergerProjector(nn.Module):
    """``[M, kh*kw, D]`` -> ``[M, T]``: LayerNorm per patch, concatenate the cell, two linears with GELU between."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        merged = a.hidden_size * a.merge_size
        self.pre_norm = nn.LayerNorm(a.mm_hidden_size, eps=a.projector_ln_eps)
        self.proj = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, a.text_hidden_size))

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pre_norm(cells).flatten(1))


class KimiVisionEncoder(nn.Module):
    """MoonViT + projector: what replaces the ``<|media_pad|>`` embeddings of the text model."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.vision_tower = MoonViT(a)
        self.mm_projector = PatchMergerProjector(a)

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> list[torch.Tensor]:
        """``pixels [N, 3, p, p]`` (all images' patches, packed) -> one ``[tokens_i, T]`` per image."""
        for h, w in grids:
            kh, kw = self.args.merge_kernel_size
            if h % kh or w % kw:
                raise ValueError(f"patch grid {h}x{w} is not a multiple of the merge kernel {kh}x{kw}")
        if pixels.shape[0] != sum(h * w for h, w in grids):
            raise ValueError(f"{pixels.shape[0]} patches for grids {grids}")
        cells = self.vision_tower(pixels.to(self.mm_projector.pre_norm.weight.dtype), grids)
        return [self.mm_projector(c) for c in cells]
