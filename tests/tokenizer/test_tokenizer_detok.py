"""IncrementalDetokenizer: only complete UTF-8 leaves it, and the stream equals the one-shot decode."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2ray.tokenizer import IncrementalDetokenizer, KimiTokenizer
from k2ray.tokenizer.tiny import DATA_DIR


@pytest.fixture(scope="module")
def tok():
    return KimiTokenizer.from_dir(DATA_DIR)


def _stream(tok, ids, groups, skip):
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces, i = [], 0
    for g in groups:
        pieces.append(d.feed(ids[i : i + g]))
        i += g
    pieces.append(d.feed(ids[i:]))
    pieces.append(d.flush())
    return d, pieces


def test_multibyte_char_is_held_until_complete(tok):
    ids = tok.encode("é😀中")
    assert len(ids) == 2 + 4 + 3  # no merges for these: one byte per token
    d = IncrementalDetokenizer(tok)
    out = [d.feed(i) for i in ids]
    assert out == ["", "é", "", "", "", "😀", "", "", "中"]
    assert d.flush() == "" and d.text == "é😀中"


def test_special_tokens_shown_or_skipped(tok):
    ids = tok.encode("<think>hi</think>ok<|im_end|>", allow_special=True)
    shown = IncrementalDetokenizer(tok)
    assert "".join(shown.feed(i) for i in ids) == "<think>hi</think>ok<|im_end|>"
    hidden = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert "".join(hidden.feed(i) for i in ids) == "hiok"


def test_incomplete_tail_is_flushed_as_replacement(tok):
    ids = tok.encode("a😀")[:-1]  # cut inside the emoji
    d = IncrementalDetokenizer(tok)
    assert d.feed(ids) == "a" and d.pending
    assert d.flush() == "\ufffd"
    assert d.text == tok.decode(ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["<|im_end|>", "<think>", "[EOS]", "<|tool_call_begin|>"])), max_size=8),
    st.lists(st.integers(0, 5), max_size=40),
    st.booleans(),
)
def test_stream_equals_one_shot(tok, parts, groups, skip):
    ids = tok.encode("".join(parts), allow_special=True)
    d, pieces = _stream(tok, ids, groups, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip) == d.text
    if "\ufffd" not in d.text:
        assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2303), max_size=30), st.lists(st.integers(0, 4), max_size=20))
def test_arbitrary_ids_never_break(tok, ids, groups):
    """Random ids form invalid UTF-8: the stream still equals decode(..., errors='replace')."""
    for skip in (False, True):
        d, pieces = _stream(tok, ids, groups, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
