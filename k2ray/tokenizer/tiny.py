"""The tiny k2ray tokenizer files (shipped as package data, copied byte for byte).

``k2ray/tokenizer/data/`` holds ``tiktoken.model`` (2048 base tokens, regenerate with
``tools/make_tiny_bpe.py``), ``tokenizer_config.json`` (the 256 K2 specials at 2048 + i) and
``chat_template.jinja`` (Kimi K2-Thinking format).

``write_tokenizer_files(dir, base_vocab=163_584)`` writes the same tokenizer widened to the real K2 vocabulary size
(the ``k2-mini`` checkpoint): the 2048 tiny tokens keep their ids, filler tokens fill the ids up to ``base_vocab``
(plain ASCII, never produced by encoding: no chain of merges reaches them) and the 256 specials move to
``base_vocab + i``, the K2 offsets.
"""

from __future__ import annotations

import base64
import json
import os
import shutil

__all__ = ["TOKENIZER_FILES", "DATA_DIR", "write_tokenizer_files", "write_k25_files"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "tokenization_kimi.py")


TINY_BASE_TOKENS = 2048


def write_tokenizer_files(model_dir: str | os.PathLike, base_vocab: int | None = None) -> list[str]:
    """Copy the tiny tokenizer files into ``model_dir`` (created if needed); returns the paths written.

    ``base_vocab`` (at least 2048) widens the vocabulary to that many base tokens (see the module docstring)."""
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    written = []
    for name in TOKENIZER_FILES:
        dst = os.path.join(model_dir, name)
        shutil.copyfile(os.path.join(DATA_DIR, name), dst)
        written.append(dst)
    if base_vocab is not None and base_vocab != TINY_BASE_TOKENS:
        _widen(model_dir, base_vocab)
    return written


def filler_token(rank: int) -> bytes:
    """The bytes of filler token ``rank`` (ranks 2048 .. base_vocab - 1 of a widened vocabulary)."""
    return b"<k2-filler-%06d>" % rank


def _widen(model_dir: str, base_vocab: int) -> None:
    from k2ray.tokenizer.tokenizer import reserved_token_name

    if base_vocab < TINY_BASE_TOKENS:
        raise ValueError(f"base_vocab must be at least {TINY_BASE_TOKENS}, got {base_vocab}")
    with open(os.path.join(model_dir, "tiktoken.model"), "a", encoding="ascii") as fh:
        fh.writelines(f"{base64.b64encode(filler_token(r)).decode()} {r}\n" for r in range(TINY_BASE_TOKENS, base_vocab))
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    shift = base_vocab - TINY_BASE_TOKENS
    decoder = {}
    for key, entry in cfg["added_tokens_decoder"].items():
        old = int(key)
        entry = dict(entry)
        if entry.get("content") == reserved_token_name(old):
            entry["content"] = reserved_token_name(old + shift)
        decoder[str(old + shift)] = entry
    cfg["added_tokens_decoder"] = decoder
    with open(cfg_path, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


K25_CHAT_TEMPLATE = "chat_template_k25.jinja"


def write_k25_files(model_dir: str | os.PathLike) -> str:
    """Replace the chat template with the Kimi K2.5-style one (image parts render as media markers)."""
    dst = os.path.join(os.fspath(model_dir), "chat_template.jinja")
    shutil.copyfile(os.path.join(DATA_DIR, K25_CHAT_TEMPLATE), dst)
    return dst
