"""The Kimi K2 tokenizer: tiktoken byte-level BPE + 256 reserved special ids.

A model directory holds ``tiktoken.model`` (one ``base64(token_bytes) rank`` per line) and
``tokenizer_config.json`` (``added_tokens_decoder`` names the special ids, ``bos_token`` /
``eos_token`` / ``pad_token`` pick the roles).  Nothing here depends on the size of the base
vocabulary: the tiny k2ray vocabulary (2048 base tokens) and the real one (163,584) load the
same way, and the specials always sit at ``n_base + i`` for ``i`` in ``0..255``.

Encoding follows the original Kimi tokenizer exactly: the K2 split pattern (run by tiktoken's
Rust regex engine, which understands the ``&&`` class intersection), and long inputs cut into
chunks of at most 400,000 characters, each chunk further cut so that no run of whitespace or
of non-whitespace is longer than 25,000 characters (this keeps BPE of pathological inputs
linear instead of quadratic).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from functools import lru_cache
from typing import Iterable, Iterator, Mapping

import tiktoken

from . import kimi_format as kf

__all__ = [
    "K2_PAT_STR",
    "NUM_RESERVED_SPECIAL_TOKENS",
    "K2_NAMED_SPECIAL_OFFSETS",
    "KimiTokenizer",
    "IncrementalDetokenizer",
    "load_tiktoken_ranks",
    "reserved_token_name",
]

# The K2 pre-tokenizer split pattern (tiktoken / fancy-regex syntax).
K2_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# Offsets (from the first special id) of the named K2 special tokens.
K2_NAMED_SPECIAL_OFFSETS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: kf.TOOL_CALLS_SECTION_BEGIN,
    12: kf.TOOL_CALLS_SECTION_END,
    13: kf.TOOL_CALL_BEGIN,
    14: kf.TOOL_CALL_ARGUMENT_BEGIN,
    15: kf.TOOL_CALL_END,
    17: "<|im_middle|>",
    18: "<|media_begin|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    22: kf.THINK_START,
    23: kf.THINK_END,
    254: "[UNK]",
    255: "[PAD]",
}

# Limits of the original Kimi tokenizer (tiktoken panics beyond ~400k chars per call; long
# same-class runs make BPE quadratic).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_SAME_CLASS_RUN_CHARS = 25_000

# A maximal run of whitespace, or of non-whitespace.  Python's `\s` on str patterns is the
# same predicate as str.isspace(), which the original chunker uses.
_RUN_RE = re.compile(r"\s+|\S+")


def reserved_token_name(token_id: int) -> str:
    """Name of an unnamed special id (the original tokenizer uses the absolute id)."""
    return f"<|reserved_token_{token_id}|>"


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``tiktoken.model`` file: one ``base64(bytes) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except Exception as exc:  # noqa: BLE001 - report the line
                raise ValueError(f"{os.fspath(path)}:{lineno}: malformed tiktoken line") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{os.fspath(path)}: ranks must be exactly 0..n-1 with unique token bytes")
    return ranks


def _split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut ``text`` so that no piece contains a same-class run longer than ``max_run``.

    Equivalent to the original per-character loop: a cut is made inside a run of
    whitespace / non-whitespace every ``max_run`` characters of that run; pieces otherwise
    span several runs.
    """
    if len(text) <= max_run:
        yield text
        return
    start = 0
    for m in _RUN_RE.finditer(text):
        run_start, run_end = m.span()
        cut = run_start + max_run
        while cut < run_end:
            yield text[start:cut]
            start = cut
            cut += max_run
    yield text[start:]


def _chunks(text: str) -> Iterator[str]:
    for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_SAME_CLASS_RUN_CHARS)


@lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character map (how HF shows byte-level tokens)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@lru_cache(maxsize=None)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _token_content(entry: object) -> str | None:
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        content = entry.get("content")
        return content if isinstance(content, str) else None
    return None


class KimiTokenizer:
    """tiktoken-backed Kimi tokenizer (works for the tiny vocabulary and for the real K2 one)."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names: Mapping[int, str] | None = None,
        *,
        bos_token: str | None = "[BOS]",
        eos_token: str | None = "[EOS]",
        pad_token: str | None = "[PAD]",
        unk_token: str | None = "[UNK]",
        model_max_length: int | None = None,
        name: str = "kimi",
    ) -> None:
        self._n_base = len(mergeable_ranks)
        n = self._n_base
        special_names = dict(special_names or {})
        specials: dict[str, int] = {}
        for i in range(n, n + NUM_RESERVED_SPECIAL_TOKENS):
            tok = special_names.get(i) or reserved_token_name(i)
            if tok in specials:
                raise ValueError(f"special token {tok!r} is named twice (ids {specials[tok]} and {i})")
            specials[tok] = i
        self._special_tokens = specials
        self._special_by_id = {i: t for t, i in specials.items()}
        self._ranks = mergeable_ranks
        self._bytes_by_id: list[bytes] | None = None
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=K2_PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=specials,
        )
        # Longest first so that the alternation never stops at a shorter special.
        self._special_re = re.compile(
            "|".join(re.escape(t) for t in sorted(specials, key=lambda s: (-len(s), s)))
        )
        self.bos_token = bos_token if bos_token in specials else None
        self.eos_token = eos_token if eos_token in specials else None
        self.pad_token = pad_token if pad_token in specials else None
        self.unk_token = unk_token if unk_token in specials else None
        self.model_max_length = model_max_length

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "KimiTokenizer":
        """Load ``tiktoken.model`` (+ ``tokenizer_config.json`` when present) from a directory."""
        model_dir = os.fspath(model_dir)
        ranks = load_tiktoken_ranks(os.path.join(model_dir, "tiktoken.model"))
        cfg: dict = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        names: dict[int, str] = {}
        for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = _token_content(entry)
            if content is not None:
                names[int(key)] = content

        def role(key: str, default: str) -> str | None:
            if key in cfg:
                return _token_content(cfg[key])
            return default

        max_len = cfg.get("model_max_length")
        return cls(
            ranks,
            names,
            bos_token=role("bos_token", "[BOS]"),
            eos_token=role("eos_token", "[EOS]"),
            pad_token=role("pad_token", "[PAD]"),
            unk_token=role("unk_token", "[UNK]"),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) else None,
            name=os.path.basename(os.path.normpath(model_dir)) or "kimi",
        )

    # ------------------------------------------------------------------ vocabulary facts
    @property
    def n_base_tokens(self) -> int:
        return self._n_base

    @property
    def vocab_size(self) -> int:
        return self._n_base + NUM_RESERVED_SPECIAL_TOKENS

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def _id_of(self, tok: str | None) -> int | None:
        return None if tok is None else self._special_tokens[tok]

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on ``[EOS]`` and ``<|im_end|>`` (and the configured eos)."""
        ids = {self._special_tokens[t] for t in ("[EOS]", "<|im_end|>") if t in self._special_tokens}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return sorted(ids)

    def is_special(self, token_id: int) -> bool:
        return self._n_base <= token_id < self.vocab_size

    def token_to_id(self, token: str) -> int:
        """Id of a special-token name, or of a base token given as text or in HF byte-level form."""
        if token in self._special_tokens:
            return self._special_tokens[token]
        u2b = _unicode_to_byte()
        if all(c in u2b for c in token):
            rank = self._ranks.get(bytes(u2b[c] for c in token))
            if rank is not None:
                return rank
        rank = self._ranks.get(token.encode("utf-8"))
        if rank is not None:
            return rank
        raise KeyError(f"unknown token {token!r}")

    def id_to_token(self, token_id: int) -> str:
        """Special-token name, or the HF byte-level spelling of a base token (e.g. ``'Ġthe'``)."""
        if self.is_special(token_id):
            return self._special_by_id[token_id]
        b2u = _byte_to_unicode()
        return "".join(b2u[b] for b in self.id_to_bytes(token_id))

    def id_to_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a base token; the UTF-8 of the name for a special token."""
        if self._bytes_by_id is None:
            table = [b""] * self._n_base
            for tok, rank in self._ranks.items():
                table[rank] = tok
            self._bytes_by_id = table
        if 0 <= token_id < self._n_base:
            return self._bytes_by_id[token_id]
        if self.is_special(token_id):
            return self._special_by_id[token_id].encode("utf-8")
        raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``allow_special=False`` (the default, and the only safe choice for user-supplied text):
        special-token strings such as ``<|im_end|>`` are encoded as ordinary text.
        ``allow_special=True``: every special-token string becomes its control id.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        out: list[int] = []
        enc = self._enc
        for chunk in _chunks(text):
            if allow_special:
                out.extend(enc.encode(chunk, allowed_special="all"))
            else:
                out.extend(enc.encode_ordinary(chunk))
        return out

    def encode_with_specials(self, pieces: Iterable[tuple[str, bool]]) -> list[int]:
        """Encode ``(text, is_control)`` pieces: control pieces must be exactly one special token."""
        out: list[int] = []
        for text, is_control in pieces:
            if is_control:
                out.append(self._special_tokens[text])
            elif text:
                out.extend(self.encode(text))
        return out

    def split_special(self, text: str) -> list[tuple[str, bool]]:
        """Split ``text`` into ``(piece, is_special_token)`` pieces (leftmost-longest matches)."""
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                pieces.append((text[pos : m.start()], False))
            pieces.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            pieces.append((text[pos:], False))
        return pieces

    @property
    def special_token_pattern(self) -> "re.Pattern[str]":
        return self._special_re

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i < self._n_base]
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"KimiTokenizer(n_base={self._n_base}, vocab_size={self.vocab_size})"


class IncrementalDetokenizer:
    """Streaming detokenizer: feed generated ids, get back only complete UTF-8 text.

    A multi-byte character split across tokens is held back until its last byte arrives;
    bytes that can never form a valid character are emitted as U+FFFD, exactly as
    ``tokenizer.decode(all_ids)`` would, so ``"".join(feed(...)) + flush()`` always equals the
    one-shot decode.  Special tokens are shown as their names, or skipped when
    ``skip_special_tokens`` is true.
    """

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.num_tokens = 0

    def feed(self, new_ids: int | Iterable[int]) -> str:
        """Add newly generated ids; return the newly printable text (possibly ``""``)."""
        if isinstance(new_ids, int):
            new_ids = (new_ids,)
        tok = self.tokenizer
        chunks = []
        for i in new_ids:
            i = int(i)
            self.num_tokens += 1
            if self.skip_special_tokens and tok.is_special(i):
                continue
            chunks.append(tok.id_to_bytes(i))
        text = self._decoder.decode(b"".join(chunks))
        if text:
            self._parts.append(text)
        return text

    # vLLM-ish alias
    step = feed

    def flush(self) -> str:
        """End of stream: emit whatever is still held back (an incomplete character -> U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])
