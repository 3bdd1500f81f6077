"""k2ray's image decoding and preprocessing against the released rule (written out in tests/vision/images.py)."""

import math

import numpy as np
import pytest
from PIL import Image

from k2ray.tokenizer.image import (ImageError, ImageProcessorConfig, decode_image, load_image, num_image_tokens,
                                   parse_data_url, preprocess_image)

from .images import data_url, encode, make_image, released_preprocess

TINY = ImageProcessorConfig(in_patch_limit=256, patch_limit_on_one_side=32)


def _unpatchify(pixel_values, grid, p=14):
    gh, gw = grid
    return pixel_values.view(gh, gw, 3, p, p).permute(0, 3, 1, 4, 2).reshape(gh * p, gw * p, 3).numpy()


@pytest.mark.parametrize("size", [(100, 70), (500, 300), (84, 56), (13, 9), (30, 900), (1, 1), (448, 449)])
def test_matches_released_rule(size):
    img = make_image(*size, seed=sum(size))
    got = preprocess_image(img, TINY)
    want, tokens = released_preprocess(img)
    assert got.num_tokens == tokens == num_image_tokens(*size, TINY)
    assert got.grid == (want.shape[0] // 14, want.shape[1] // 14)
    np.testing.assert_allclose(_unpatchify(got.pixel_values, got.grid), want, atol=1e-6)


def test_released_defaults():
    cfg = ImageProcessorConfig()
    assert (cfg.patch_size, cfg.merge_kernel_size, cfg.in_patch_limit, cfg.patch_limit_on_one_side) == (14, 2, 16384, 512)
    # 1920x1080: 137*77 = 10549 patches fit the budget; padded to 1932x1092 -> 69*39 tokens
    assert num_image_tokens(1920, 1080, cfg) == math.ceil(1080 / 28) * math.ceil(1920 / 28)
    # 4000x3000 is over budget: scaled by sqrt(16384 / (285*214))
    s = math.sqrt(16384 / (285 * 214))
    assert num_image_tokens(4000, 3000, cfg) == math.ceil(int(3000 * s) / 28) * math.ceil(int(4000 * s) / 28)


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif")])
def test_formats_decode(fmt, mime):
    img = make_image(60, 40, seed=5)
    mt, data = parse_data_url(data_url(encode(img, fmt), mime))
    assert mt == mime
    dec = decode_image(data)
    assert dec.mode == "RGB" and dec.size == (60, 40)
    if fmt == "PNG":
        assert np.array_equal(np.asarray(dec), np.asarray(img))


def test_gif_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    import io

    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    dec = np.asarray(decode_image(buf.getvalue()))
    assert dec[..., 0].mean() > 200 and dec[..., 2].mean() < 50


def test_exif_orientation_applied():
    img = make_image(40, 20, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    dec = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert dec.size == (20, 40)


def test_rgba_flattened_onto_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    dec = np.asarray(decode_image(encode(img, "PNG")))
    assert (dec[5, 5] == 255).all() and tuple(dec[0, 0]) == (255, 0, 0)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert abs(int(np.asarray(decode_image(encode(half, "PNG")))[0, 0, 0]) - 127) <= 1


def test_content_hash_follows_pixels():
    a, b = make_image(50, 50, seed=1), make_image(50, 50, seed=2)
    assert load_image(encode(a), TINY).content_hash == load_image(encode(a, "WEBP", lossless=True), TINY).content_hash
    assert load_image(encode(a), TINY).content_hash != load_image(encode(b), TINY).content_hash


@pytest.mark.parametrize("data,match", [(b"not an image", "cannot identify"), (b"", "cannot identify")])
def test_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data)


def test_unsupported_format_and_pixel_limit():
    with pytest.raises(ImageError, match="unsupported image format BMP"):
        decode_image(encode(make_image(8, 8, seed=0), "BMP"))
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(encode(make_image(100, 100, seed=0)), max_pixels=5000)


@pytest.mark.parametrize("url,match", [("http://x/y.png", "not a data: URL"), ("data:image/png,abc", "base64"),
                                       ("data:image/png;base64,@@@", "invalid base64")])
def test_bad_data_urls(url, match):
    with pytest.raises(ImageError, match=match):
        parse_data_url(url)


def test_from_dir_reads_media_proc_cfg(k25_dir, tmp_path):
    assert ImageProcessorConfig.from_dir(k25_dir) == TINY
    assert ImageProcessorConfig.from_dir(tmp_path) == ImageProcessorConfig()
