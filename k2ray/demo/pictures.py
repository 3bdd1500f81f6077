"""The demo model's synthetic pictures: a solid colour, or one red, green, blue or yellow circle, square or triangle on
a plain light background. Sizes, proportions, positions and shades vary; everything is drawn from the given
``random.Random``, so a seed gives the same pictures on any machine."""

from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw

COLOURS = {  # name -> RGB centre; each picture jitters it
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 75, 215), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (135, 55, 175), "black": (20, 20, 20), "white": (245, 245, 245),
}
SHAPE_COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def _shade(rng: random.Random, colour: str, jitter: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-jitter, jitter))) for c in COLOURS[colour])


def _size(rng: random.Random) -> tuple[int, int]:
    w = rng.randint(48, 200)
    return w, max(40, min(220, int(w * rng.uniform(0.6, 1.6))))


def solid(rng: random.Random, colour: str) -> Image.Image:
    return Image.new("RGB", _size(rng), _shade(rng, colour))


def shape_picture(rng: random.Random, shape: str, colour: str) -> Image.Image:
    """One filled shape, 55-90% of the shorter side, somewhere on a white or light grey background."""
    w, h = _size(rng)
    grey = rng.randint(200, 255)
    img = Image.new("RGB", (w, h), (grey, grey, grey))
    side = int(min(w, h) * rng.uniform(0.55, 0.9))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    fill = _shade(rng, colour)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    else:
        raise ValueError(f"shape: unknown shape {shape!r}")
    return img


def data_url(img: Image.Image) -> str:
    """The picture as a PNG ``data:`` URL, the form the OpenAI image part carries."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
