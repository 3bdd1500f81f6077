"""Kimi K2's tokenizer as a transformers tokenizer class, shipped inside each k2ray checkpoint as Kimi's releases ship
theirs: ``tokenizer_config.json`` names it through ``auto_map``, so ``AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)`` (and so vLLM and SGLang) load the checkpoint's tokenizer with no code of their own.

It stands alone (tiktoken and transformers only; k2ray need not be installed where it runs) and encodes exactly as
k2ray's ``KimiTokenizer`` does, which the k2ray tests check on a corpus: tiktoken byte-level BPE over
``tiktoken.model`` with the K2 split pattern, 256 special ids after the base vocabulary (named in
``added_tokens_decoder``, the rest ``<|reserved_token_ID|>``), long inputs cut into chunks of at most 400,000
characters with no run of whitespace or non-whitespace longer than 25,000.
"""

import base64
import re

import tiktoken
from transformers import PreTrainedTokenizer

K2_PATTERN = "|".join(
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
NUM_SPECIAL = 256
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def _byte_symbols():
    """GPT-2's byte -> printable character table: how byte-level tokens are written as strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return table


def _pieces(text):
    """``text`` in the pieces tiktoken is given: chunks of ``MAX_CHUNK_CHARS``, each cut inside any run of whitespace
    or of non-whitespace every ``MAX_RUN_CHARS`` characters of that run (the original Kimi tokenizer's cuts)."""
    for i in range(0, len(text), MAX_CHUNK_CHARS):
        chunk = text[i:i + MAX_CHUNK_CHARS]
        start = 0
        if len(chunk) > MAX_RUN_CHARS:
            for m in _RUNS.finditer(chunk):
                cut = m.start() + MAX_RUN_CHARS
                while cut < m.end():
                    yield chunk[start:cut]
                    start, cut = cut, cut + MAX_RUN_CHARS
        yield chunk[start:]


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]",
                 added_tokens_decoder=None, **kwargs):
        ranks = {}
        with open(vocab_file, "rb") as fh:
            for line in fh:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        n = len(ranks)
        names = {}
        for key, entry in (added_tokens_decoder or {}).items():
            names[int(key)] = entry["content"] if isinstance(entry, dict) else str(entry)
        specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + NUM_SPECIAL)}
        self._encoding = tiktoken.Encoding(name="kimi-k2", pat_str=K2_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=specials)
        symbols = _byte_symbols()
        self._token_of = {rank: "".join(symbols[b] for b in token) for token, rank in ranks.items()}
        self._token_of.update({i: t for t, i in specials.items()})
        self._id_of = {t: i for i, t in self._token_of.items()}
        self._byte_of = {c: b for b, c in symbols.items()}
        self.vocab_file = vocab_file
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         added_tokens_decoder=added_tokens_decoder, **kwargs)

    @property
    def vocab_size(self):
        return len(self._token_of)

    def get_vocab(self):
        return dict(self._id_of)

    def _tokenize(self, text, **kwargs):
        # Special tokens were split out by the base class; the text between them is plain text.
        return [self._token_of[i] for piece in _pieces(text) for i in self._encoding.encode_ordinary(piece)]

    def _convert_token_to_id(self, token):
        return self._id_of.get(token, self._id_of.get(self.unk_token))

    def _convert_id_to_token(self, index):
        return self._token_of[index]

    def convert_tokens_to_string(self, tokens):
        out, text = bytearray(), []
        for token in tokens:
            if token in self._id_of and self._id_of[token] >= len(self._token_of) - NUM_SPECIAL:
                text.append(out.decode("utf-8", errors="replace") + token)
                out = bytearray()
            else:
                out.extend(self._byte_of[c] for c in token)
        return "".join(text) + out.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        import os
        import shutil

        name = (filename_prefix + "-" if filename_prefix else "") + "tiktoken.model"
        path = os.path.join(save_directory, name)
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, path)
        return (path,)
