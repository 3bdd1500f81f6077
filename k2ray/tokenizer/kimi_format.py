"""Kimi K2's output format in one place: the think and tool-call markers and the tool-call id.

What the model writes (K2-Thinking)::

    [<think>] reasoning </think> content
        <|tool_calls_section_begin|>
            <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {json} <|tool_call_end|> ...
        <|tool_calls_section_end|>

The markers are special tokens of the K2 tokenizer (the singular section spelling is not, but some K2 outputs and
other engines' prompts use it, so it is accepted wherever the plural one is). The chat templates (``*.jinja``) spell
the same strings on their own; everything in Python takes them from here.
"""

from __future__ import annotations

import re

__all__ = [
    "THINK_START",
    "THINK_END",
    "THINK_MARKERS",
    "TOOL_CALLS_SECTION_BEGIN",
    "TOOL_CALLS_SECTION_END",
    "TOOL_CALL_SECTION_BEGIN_ALT",
    "TOOL_CALL_SECTION_END_ALT",
    "TOOL_CALL_BEGIN",
    "TOOL_CALL_ARGUMENT_BEGIN",
    "TOOL_CALL_END",
    "TOOL_MARKERS",
    "TOOL_CALL_ID_PREFIX",
    "tool_call_id",
    "parse_tool_call_id",
    "split_call_id",
]

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_SECTION_BEGIN_ALT = "<|tool_call_section_begin|>"
TOOL_CALL_SECTION_END_ALT = "<|tool_call_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"

THINK_MARKERS = (THINK_START, THINK_END)
# The markers that open, close or structure a tool-call section (what free text must not spell). The singular
# closer is left out: the parser accepts it, but nothing is opened by it.
TOOL_MARKERS = (
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    TOOL_CALL_SECTION_BEGIN_ALT,
    TOOL_CALL_BEGIN,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_END,
)

TOOL_CALL_ID_PREFIX = "functions."
_ID_RE = re.compile(re.escape(TOOL_CALL_ID_PREFIX) + r"(.+):(\d+)", re.DOTALL)
_LOOSE_ID_RE = re.compile(r"(?:" + re.escape(TOOL_CALL_ID_PREFIX) + r")?(.+?):(\d+)", re.DOTALL)


def tool_call_id(name: str, index: int) -> str:
    """Kimi's id of a tool call, ``functions.NAME:IDX``: ``index`` counts the conversation's tool calls from 0."""
    return f"{TOOL_CALL_ID_PREFIX}{name}:{index}"


def parse_tool_call_id(call_id: str) -> tuple[str, int] | None:
    """``(name, index)`` of an id of exactly Kimi's form (``functions.a.b:3`` -> ``('a.b', 3)``), else None."""
    m = _ID_RE.fullmatch(call_id)
    return (m.group(1), int(m.group(2))) if m else None


def split_call_id(raw: str) -> tuple[str, int | None] | None:
    """What the model wrote as an id, read leniently: ``'functions.a.b-c:3'`` -> ``('a.b-c', 3)``;
    ``'call_x'`` -> ``('call_x', None)``; junk (empty, or whitespace inside the name) -> None."""
    s = raw.strip()
    m = _LOOSE_ID_RE.fullmatch(s)
    if m:
        name, idx = m.group(1), int(m.group(2))
    else:
        name, idx = s.removeprefix(TOOL_CALL_ID_PREFIX), None
    if not name or any(c.isspace() for c in name):
        return None
    return name, idx
