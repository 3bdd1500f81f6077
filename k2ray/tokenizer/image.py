"""Images for Kimi K2.5: bytes -> RGB picture -> MoonViT's patches, and how many ``<|media_pad|>`` tokens it takes.

Decoding (Pillow): PNG, JPEG, WebP and GIF (first frame); the EXIF orientation is applied; transparency is flattened
onto white; anything else is converted to RGB.

Preprocessing (the checkpoint's ``preprocessor_config.json`` ``media_proc_cfg``; the release's values by default)::

    s = min(1, sqrt(in_patch_limit / (max(1, W // p) * max(1, H // p))), side * p / W, side * p / H)
    W', H' = max(1, int(W * s)), max(1, int(H * s))       (capped at side * p), PIL bicubic when smaller
    zero-pad right and bottom to multiples of merge * p; x -> (x / 255 - mean) / std
    patches [H'/p * W'/p, 3, p, p] in raster order;  tokens = ceil(H' / (merge p)) * ceil(W' / (merge p))

with ``p`` = 14, ``merge`` = 2, ``in_patch_limit`` = 16384, ``side`` = 512 in the release.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = ["ImageError", "ImageProcessorConfig", "ProcessedImage", "decode_image", "preprocess_image",
           "parse_data_url", "load_image", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
SUPPORTED_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
                  "image/gif": "GIF"}


class ImageError(ValueError):
    """An image that cannot be used: undecodable, an unsupported format, too large. The message says why."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int = 14
    merge_kernel_size: int = 2
    in_patch_limit: int = 16384
    patch_limit_on_one_side: int = 512
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "ImageProcessorConfig":
        """``preprocessor_config.json``'s ``media_proc_cfg`` (the release's values where it is silent or absent)."""
        path = os.path.join(os.fspath(model_dir), "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        cfg = raw.get("media_proc_cfg", raw)
        kwargs = {}
        for name in ("patch_size", "merge_kernel_size", "in_patch_limit", "patch_limit_on_one_side"):
            if cfg.get(name) is not None:
                v = cfg[name]
                kwargs[name] = int(v[0] if isinstance(v, (list, tuple)) else v)
        for name in ("image_mean", "image_std"):
            if cfg.get(name) is not None:
                kwargs[name] = tuple(float(x) for x in cfg[name])
        return cls(**kwargs)


@dataclass
class ProcessedImage:
    """One image ready for the encoder."""

    pixel_values: torch.Tensor  # float32 [h * w, 3, p, p], patches in raster order
    grid: tuple[int, int]  # (h, w) patches, both multiples of the merge kernel
    num_tokens: int  # <|media_pad|> tokens it takes = h * w / merge**2
    content_hash: bytes  # of the pixels the encoder sees (equal hashes: equal embeddings)
    size: tuple[int, int]  # (width, height) as decoded
    resized: tuple[int, int] = field(default=(0, 0))  # (width, height) after resizing, before padding


def parse_data_url(url: str) -> tuple[str, bytes]:
    """``data:image/png;base64,...`` -> (media type, bytes). Raises :class:`ImageError`."""
    m = re.match(r"data:([^;,]*)((?:;[^;,]*)*),", url)
    if m is None:
        raise ImageError("not a data: URL")
    mime = m.group(1).strip().lower()
    params = [p.strip().lower() for p in m.group(2).split(";") if p.strip()]
    payload = url[m.end():]
    if "base64" not in params:
        raise ImageError("data: URL without ;base64 (only base64 image data is accepted)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data: URL: invalid base64") from None
    return mime, data


def decode_image(data: bytes, max_pixels: Optional[int] = None):
    """Bytes -> an RGB ``PIL.Image`` (first frame, EXIF orientation applied, transparency on white)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("cannot identify the image (PNG, JPEG, WebP or GIF expected)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode the image: {e}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {img.format} (PNG, JPEG, WebP or GIF expected)")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("empty image")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        img.seek(0)  # GIF: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba).convert("RGB")
        elif img.mode != "RGB":
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode the image: {e}") from None
    return img


def resized_size(width: int, height: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """The (width, height) the image is resized to (never larger than given)."""
    p, side = cfg.patch_size, cfg.patch_limit_on_one_side
    patches = max(1, width // p) * max(1, height // p)
    scale = min(1.0, math.sqrt(cfg.in_patch_limit / patches), side * p / width, side * p / height)
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    return min(new_w, side * p), min(new_h, side * p)


def num_image_tokens(width: int, height: int, cfg: ImageProcessorConfig) -> int:
    """Tokens of an image of ``width x height`` pixels (before resizing)."""
    w, h = resized_size(width, height, cfg)
    f = cfg.merge_kernel_size * cfg.patch_size
    return math.ceil(h / f) * math.ceil(w / f)


def preprocess_image(img, cfg: ImageProcessorConfig) -> ProcessedImage:
    """An RGB ``PIL.Image`` -> :class:`ProcessedImage` (see the module docstring for the rule)."""
    from PIL import Image

    width, height = img.size
    new_w, new_h = resized_size(width, height, cfg)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    p, f = cfg.patch_size, cfg.merge_kernel_size * cfg.patch_size
    pad_w, pad_h = math.ceil(new_w / f) * f, math.ceil(new_h / f) * f
    canvas = np.zeros((pad_h, pad_w, 3), dtype=np.uint8)  # zero padding right and bottom
    canvas[:new_h, :new_w] = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(canvas).permute(2, 0, 1).float() / 255.0  # [3, H, W]
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    x = (x - mean) / std
    gh, gw = pad_h // p, pad_w // p
    patches = x.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p).contiguous()
    digest = hashlib.blake2b(canvas.tobytes(), digest_size=16)
    digest.update(f"{pad_w}x{pad_h};{cfg}".encode())
    num_tokens = (gh // cfg.merge_kernel_size) * (gw // cfg.merge_kernel_size)
    return ProcessedImage(patches, (gh, gw), num_tokens, digest.digest(), (width, height), (new_w, new_h))


def load_image(data: bytes, cfg: ImageProcessorConfig, max_pixels: Optional[int] = None) -> ProcessedImage:
    """Decode and preprocess. Raises :class:`ImageError`."""
    return preprocess_image(decode_image(data, max_pixels), cfg)
