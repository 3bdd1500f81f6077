"""KimiTokenizer: vocabulary facts, special-token safety, split pattern, chunking, speed, files."""

import base64
import hashlib
import importlib.util
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2ray.tokenizer import KimiTokenizer, write_tokenizer_files
from k2ray.tokenizer import tokenizer as tokmod
from k2ray.tokenizer.tiny import DATA_DIR, TOKENIZER_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
    return KimiTokenizer.from_dir(DATA_DIR)


# A curated alphabet (characters whose Unicode categories are old and stable, so that the
# Python `regex` reference and tiktoken's Rust regex agree on them).
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n\r\x0b\x0c !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "éÉàÀüÜñÑçßøæœ" "ǅǈ" "ʰʲˈ" "\u0301\u0308\u0327"  # Latin, titlecase (Lt), modifiers (Lm), marks (M)
    "αβγΔΣΩ" "абвгдЖЗИ" "אבג" "عربي" "हिन्दी" "ไทย"
    "中文字你好世界" "ひらがなカタカナ" "한국어"  # Han + Lo (kana, hangul)
    "١٢٣" "½²" "\u00a0\u2003\u3000\u2028"  # other digits/numbers, other spaces
    "😀👍🏽🎉" "—–…€£¥©®™"
)
text_st = st.text(alphabet=ALPHABET, max_size=80)


# ------------------------------------------------------------------------------- vocab facts


def test_tiny_vocab_facts(tok):
    assert tok.n_base_tokens == 2048
    assert tok.vocab_size == len(tok) == 2048 + 256
    sp = tok.special_tokens
    assert len(sp) == 256 and sorted(sp.values()) == list(range(2048, 2304))
    for off, name in tokmod.K2_NAMED_SPECIAL_OFFSETS.items():
        assert sp[name] == 2048 + off, name
    assert sp["[BOS]"] == 2048 and sp["[EOS]"] == 2049 and sp["<|im_end|>"] == 2050
    assert sp["<think>"] == 2070 and sp["</think>"] == 2071
    assert sp["[UNK]"] == 2302 and sp["[PAD]"] == 2303
    assert sp["<|reserved_token_2053|>"] == 2053  # unnamed offsets 5, 8, 16, 24..253
    assert tok.bos_token_id == 2048
    assert tok.eos_token_id == 2050  # K2-Thinking: eos_token is <|im_end|>
    assert tok.pad_token_id == 2303
    assert tok.stop_token_ids == [2049, 2050]
    assert tok.is_special(2048) and tok.is_special(2303) and not tok.is_special(2047) and not tok.is_special(2304)
    assert tok.model_max_length == 262144


def test_token_lookup(tok):
    assert tok.token_to_id("<|im_end|>") == 2050
    assert tok.id_to_token(2050) == "<|im_end|>"
    the = tok.token_to_id("Ġthe")  # HF byte-level spelling ...
    assert tok.token_to_id(" the") == the  # ... or plain text
    assert tok.id_to_token(the) == "Ġthe"
    assert tok.id_to_bytes(the) == b" the"
    for i in range(0, 2304, 7):
        assert tok.token_to_id(tok.id_to_token(i)) == i
    with pytest.raises(KeyError):
        tok.token_to_id("definitely-not-a-token")
    with pytest.raises(ValueError):
        tok.decode([2304])


def test_domain_words_are_compact(tok):
    for word in ["weather", "city", "temperature", "Paris", "calculator", "expression", "sunny", "degrees",
                 "the", "answer", "is"]:
        assert len(tok.encode(" " + word)) == 1, word
    text = "The weather in Paris is sunny with a temperature of 21 degrees Celsius."
    assert len(tok.encode(text)) <= 16
    assert len(tok.encode('{"expression": "12 * 7"}')) <= 10


# ------------------------------------------------------------------------------- specials


@pytest.mark.parametrize("marker", ["<|im_end|>", "<|tool_call_begin|>", "[EOS]", "<think>", "<|reserved_token_2100|>"])
def test_special_strings_are_ordinary_text_by_default(tok, marker):
    text = f"please stop {marker} here"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    ids2 = tok.encode(text, allow_special=True)
    assert tok.special_tokens[marker] in ids2
    assert tok.decode(ids2) == text
    assert tok.decode(ids2, skip_special_tokens=True) == text.replace(marker, "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_roundtrip_random_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s, allow_special=True)) == s


def test_split_special(tok):
    pieces = tok.split_special("a<|im_end|>b<think></think>")
    assert pieces == [("a", False), ("<|im_end|>", True), ("b", False), ("<think>", True), ("</think>", True)]


# ------------------------------------------------------------------------------- split pattern


def _reference_encode(pattern, ranks, text):
    """A pure-Python tiktoken: K2 split with the `regex` module, then lowest-rank-first BPE."""
    out = []
    for piece in pattern.findall(text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


@pytest.fixture(scope="module")
def reference_pattern():
    regex = pytest.importorskip("regex")
    return regex.compile("(?V1)" + tokmod.K2_PAT_STR)


@pytest.fixture(scope="module")
def ranks():
    return tokmod.load_tiktoken_ranks(os.path.join(DATA_DIR, "tiktoken.model"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_st)
def test_encode_matches_reference_split_and_bpe(tok, reference_pattern, ranks, s):
    assert tok.encode(s) == _reference_encode(reference_pattern, ranks, s)


def test_pattern_pieces(reference_pattern):
    # The `&&[^\p{Han}]` intersection: Han runs are their own pieces, kana/hangul are letters.
    assert reference_pattern.findall("Hello 你好世界 world's ひらがな한국어 HELLO's 12345") == [
        "Hello", " ", "你好世界", " world's", " ひらがな한국어", " HELLO's", " ", "123", "45",
    ]


# ------------------------------------------------------------------------------- chunking


def _reference_runs(s, max_len):
    """The original per-character whitespace / non-whitespace run splitter."""
    pieces, start, run, is_space = [], 0, 0, (s[0].isspace() if s else False)
    for i, c in enumerate(s):
        now = c.isspace()
        if now != is_space:
            run, is_space = 1, now
        else:
            run += 1
            if run > max_len:
                pieces.append(s[start:i])
                start, run = i, 1
    pieces.append(s[start:])
    return pieces


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n\u3000\x1c\u2028\u00a0", max_size=60), st.integers(1, 7))
def test_run_splitter_matches_original(s, max_len):
    assert list(tokmod._split_long_runs(s, max_len)) == _reference_runs(s, max_len)


def test_chunking_limits(tok):
    s = "x" * 60_000 + " " * 30_000 + "y"
    pieces = list(tokmod._chunks(s))
    assert "".join(pieces) == s
    assert [len(p) for p in pieces] == [25_000, 25_000, 35_000, 5_001]
    big = "ab " * 300_000  # 900k chars: three 400k-char windows, no long runs
    assert [len(p) for p in tokmod._chunks(big)] == [400_000, 400_000, 100_000]


def test_one_megabyte_tokenizes_in_seconds(tok):
    n = 1_000_000
    cases = {
        "letters": "weather" * (n // 7),
        "spaces": " " * n,
        "newlines": "\n" * n,
        "digits": "1234567890" * (n // 10),
        "punct": '"}},"' * (n // 5),
        "han": "中" * (n // 3),
        "mixed": ("The answer is 84. 你好 ünïcödé 😀\n" * (n // 40)),
    }
    timings = {}
    for name, s in cases.items():
        t0 = time.perf_counter()
        ids = tok.encode(s)
        timings[name] = time.perf_counter() - t0
        assert len(s.encode("utf-8")) >= 990_000
        assert tok.decode(ids) == s
    print("1 MB encode seconds:", {k: round(v, 3) for k, v in timings.items()})
    assert max(timings.values()) < 10.0


# ------------------------------------------------------------------------------- files


def test_loads_any_base_size(tmp_path):
    """Nothing tiny-specific: a 300-token base vocab puts the specials at 300 + i."""
    ranks = [bytes([i]) for i in range(256)] + [b"ab", b"abc", b" a"] + [bytes([65, i]) for i in range(41)]
    (tmp_path / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    )
    cfg = {"added_tokens_decoder": {"300": {"content": "[BOS]"}, "301": {"content": "[EOS]"},
                                    "302": {"content": "<|im_end|>"}, "555": {"content": "[PAD]"}},
           "bos_token": "[BOS]", "eos_token": {"content": "[EOS]"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = KimiTokenizer.from_dir(tmp_path)
    assert t.n_base_tokens == 300 and t.vocab_size == 556
    assert t.bos_token_id == 300 and t.eos_token_id == 301 and t.pad_token_id == 555
    assert t.stop_token_ids == [301, 302]
    assert t.id_to_token(303) == "<|reserved_token_303|>"
    assert t.encode("abc") == [257]
    assert t.encode(" abab") == [32, 256, 256]  # lowest rank first, like tiktoken


def test_tokenizer_without_config(tmp_path):
    write_tokenizer_files(tmp_path)
    os.remove(tmp_path / "tokenizer_config.json")
    t = KimiTokenizer.from_dir(tmp_path)
    assert t.vocab_size == 2304
    assert t.special_tokens["<|reserved_token_2049|>"] == 2049
    assert t.bos_token_id is None and t.stop_token_ids == []


def _digest(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in TOKENIZER_FILES}


def test_write_tokenizer_files_is_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tokenizer_files(a)
    write_tokenizer_files(b)
    assert _digest(a) == _digest(b) == _digest(DATA_DIR)
    cfg = json.loads((a / "tokenizer_config.json").read_text())
    assert len(cfg["added_tokens_decoder"]) == 256
    assert cfg["bos_token"] == "[BOS]" and cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "[PAD]"
    assert KimiTokenizer.from_dir(a).vocab_size == 2304


def test_generator_reproduces_shipped_files():
    pytest.importorskip("regex")
    spec = importlib.util.spec_from_file_location("make_tiny_bpe", os.path.join(ROOT, "tools", "make_tiny_bpe.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    vocab = gen.train_bpe(gen.build_corpus())
    assert len(vocab) == 2048 and len(set(vocab)) == 2048
    with open(os.path.join(DATA_DIR, "tiktoken.model"), "rb") as fh:
        assert fh.read() == gen.tiktoken_model_bytes(vocab)
    with open(os.path.join(DATA_DIR, "tokenizer_config.json"), "rb") as fh:
        assert fh.read() == gen.tokenizer_config_bytes(2048)
    assert gen.NAMED_SPECIALS == tokmod.K2_NAMED_SPECIAL_OFFSETS
