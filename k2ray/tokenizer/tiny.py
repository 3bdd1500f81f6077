"""The tiny k2ray tokenizer files (shipped as package data, copied byte for byte).

``k2ray/tokenizer/data/`` holds ``tiktoken.model`` (2048 base tokens, regenerate with
``tools/make_tiny_bpe.py``), ``tokenizer_config.json`` (the 256 K2 specials at 2048 + i) and
``chat_template.jinja`` (Kimi K2-Thinking format).
"""

from __future__ import annotations

import os
import shutil

__all__ = ["TOKENIZER_FILES", "DATA_DIR", "write_tokenizer_files", "write_k25_files"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")


def write_tokenizer_files(model_dir: str | os.PathLike) -> list[str]:
    """Copy the tiny tokenizer files into ``model_dir`` (created if needed); returns the paths written."""
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    written = []
    for name in TOKENIZER_FILES:
        dst = os.path.join(model_dir, name)
        shutil.copyfile(os.path.join(DATA_DIR, name), dst)
        written.append(dst)
    return written


K25_CHAT_TEMPLATE = "chat_template_k25.jinja"


def write_k25_files(model_dir: str | os.PathLike) -> str:
    """Replace the chat template with the Kimi K2.5-style one (image parts render as media markers)."""
    dst = os.path.join(os.fspath(model_dir), "chat_template.jinja")
    shutil.copyfile(os.path.join(DATA_DIR, K25_CHAT_TEMPLATE), dst)
    return dst
