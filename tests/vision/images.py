"""Test images made here (no network), and the released preprocessing rule written out independently of k2ray."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture with structure (gradients + noise), so that resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 7) % 256], -1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    arr = np.clip(base + noise - 32, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(alpha, "L"))
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def released_preprocess(img: Image.Image, patch=14, merge=2, in_patch_limit=256, side=32, mean=0.5, std=0.5):
    """The release's media_proc_cfg rule: returns (normalised HWC float array after resize + pad, num_tokens)."""
    w, h = img.size
    s = min(1.0, math.sqrt(in_patch_limit / (max(1, w // patch) * max(1, h // patch))), side * patch / w,
            side * patch / h)
    nw, nh = min(max(1, int(w * s)), side * patch), min(max(1, int(h * s)), side * patch)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    f = merge * patch
    pw, ph = -(-nw // f) * f, -(-nh // f) * f
    arr = np.zeros((ph, pw, 3), np.float32)
    arr[:nh, :nw] = np.asarray(img.convert("RGB"), np.float32)
    arr = (arr / 255.0 - mean) / std
    return arr, math.ceil(nh / f) * math.ceil(nw / f)
