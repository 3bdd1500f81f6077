"""Parse what Kimi K2 writes into OpenAI response fields: reasoning, content, tool calls.

The parsers work on text decoded WITH special tokens shown (the markers below are special
tokens of the model), whatever the client asked for in the visible text: pass the specials the
client should not see as ``hidden_tokens`` and they are removed from content and reasoning.

Output grammar (K2-Thinking)::

    [<think>] reasoning [</think>] content
        <|tool_calls_section_begin|>
            <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {json} <|tool_call_end|> ...
        <|tool_calls_section_end|> content ...

* Reasoning is everything up to ``</think>``, or up to the tool-call section when ``</think>``
  never comes (a leading ``<think>`` is optional: output may start inside a pre-filled one).
  With thinking off everything is content and the think tags are ordinary text.
* Text before, between and after tool sections is content; whitespace between calls is not.
* A call is accepted when it has an id, ``<|tool_call_argument_begin|>``, arguments that are a
  JSON object (kept byte for byte, surrounding whitespace removed; empty means ``{}``) and
  ``<|tool_call_end|>``.  Otherwise (invalid JSON, missing pieces, output cut short) it
  degrades to content text: its id and argument text, without the markers.  Nothing raises.
* Ids: the name is the id without the ``functions.`` prefix and the ``:IDX`` suffix (dots,
  dashes, colons inside the name are kept).  Ids returned are always ``functions.NAME:IDX``:
  the model's IDX when it wrote one, else ``tool_call_offset`` + the call's position, where
  ``tool_call_offset`` is the number of tool calls already in the conversation.
* The singular section spelling ``<|tool_call_section_begin|>`` / ``..._end|>`` is accepted.
* No marker (nor a fragment of one split across chunks) ever reaches content or reasoning.

``StreamingOutputParser`` is the one state machine; the one-shot functions run it over the
whole text, so streaming and one-shot results agree for every way of chunking the output.
By default a streamed call is sent when it is complete (header delta, then its arguments), so
an invalid call can still degrade to content; ``stream_arguments=True`` sends the header as
soon as the arguments start with ``{`` and then argument increments as they arrive (a call
sent that way stays a tool call even if its JSON turns out invalid or is cut short).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional

from .kimi_format import (
    THINK_END,
    THINK_START,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALL_SECTION_BEGIN_ALT,
    TOOL_CALL_SECTION_END_ALT,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    split_call_id,
    tool_call_id,
)

__all__ = [
    "MARKERS",
    "ParsedOutput",
    "StreamingOutputParser",
    "parse_output",
    "parse_tool_calls",
    "parse_reasoning",
]

_THINK_MARKERS = {THINK_START: "think_start", THINK_END: "think_end"}
_TOOL_MARKERS = {
    TOOL_CALLS_SECTION_BEGIN: "section_begin",
    TOOL_CALL_SECTION_BEGIN_ALT: "section_begin",
    TOOL_CALLS_SECTION_END: "section_end",
    TOOL_CALL_SECTION_END_ALT: "section_end",
    TOOL_CALL_BEGIN: "call_begin",
    TOOL_CALL_ARGUMENT_BEGIN: "arg_begin",
    TOOL_CALL_END: "call_end",
}
MARKERS: tuple[str, ...] = tuple(_THINK_MARKERS) + tuple(_TOOL_MARKERS)

_CALL_KINDS = frozenset(("arg_begin", "call_begin", "call_end", "section_end", "section_begin"))

# states
_REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS = range(5)


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, strict=False), dict)
    except (ValueError, RecursionError):
        return False


class ParsedOutput:
    """The accumulated result: what a non-streaming response's message carries.

    Text is kept as lists of pieces and joined on access, so folding in many small deltas
    stays linear in the output size.
    """

    def __init__(self, reasoning_content: str = "", content: str = "", tool_calls: Iterable[dict] | None = None):
        self._reasoning: list[str] = [reasoning_content] if reasoning_content else []
        self._content: list[str] = [content] if content else []
        self._calls: list[dict] = []
        for c in tool_calls or ():
            self._calls.append({"id": c.get("id"), "name": c["function"]["name"], "args": [c["function"]["arguments"]]})

    @staticmethod
    def _joined(parts: list[str]) -> str:
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @property
    def reasoning_content(self) -> str:
        return self._joined(self._reasoning)

    @property
    def content(self) -> str:
        return self._joined(self._content)

    @property
    def tool_calls(self) -> list[dict]:
        """OpenAI form: ``[{"id", "type": "function", "function": {"name", "arguments"}}]`` (a fresh list)."""
        return [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": self._joined(c["args"])}}
            for c in self._calls
        ]

    @property
    def num_tool_calls(self) -> int:
        return len(self._calls)

    def apply(self, delta: dict) -> None:
        """Fold one OpenAI delta (as produced by ``StreamingOutputParser``) into the result."""
        if delta.get("reasoning_content"):
            self._reasoning.append(delta["reasoning_content"])
        if delta.get("content"):
            self._content.append(delta["content"])
        for tc in delta.get("tool_calls", ()):
            i = tc["index"]
            while len(self._calls) <= i:
                self._calls.append({"id": None, "name": "", "args": []})
            call = self._calls[i]
            if "id" in tc:
                call["id"] = tc["id"]
            fn = tc.get("function", {})
            if "name" in fn:
                call["name"] = fn["name"]
            if fn.get("arguments"):
                call["args"].append(fn["arguments"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParsedOutput):
            return NotImplemented
        return (self.reasoning_content, self.content, self.tool_calls) == (
            other.reasoning_content, other.content, other.tool_calls)

    def __repr__(self) -> str:
        return (f"ParsedOutput(reasoning_content={self.reasoning_content!r}, content={self.content!r}, "
                f"tool_calls={self.tool_calls!r})")

    @classmethod
    def from_deltas(cls, deltas: Iterable[dict]) -> "ParsedOutput":
        out = cls()
        for d in deltas:
            out.apply(d)
        return out

    def to_message(self) -> dict:
        """An OpenAI assistant message (``content`` is None when only tool calls were produced)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": dict(c["function"])} for c in self.tool_calls
            ]
            if not self.content:
                msg["content"] = None
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        return msg


class StreamingOutputParser:
    """Incremental parser: ``feed(delta_text)`` -> OpenAI delta dicts; ``finish()`` at the end.

    Deltas are ``{"reasoning_content": str}``, ``{"content": str}``, a call header
    ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``
    and argument increments ``{"tool_calls": [{"index", "function": {"arguments": str}}]}``.
    ``result`` holds everything emitted so far, folded together.
    """

    def __init__(
        self,
        thinking: bool = True,
        tools: bool = True,
        *,
        tool_call_offset: int = 0,
        stream_arguments: bool = False,
        hidden_tokens: Iterable[str] = (),
    ) -> None:
        self.thinking = thinking
        self.tools = tools
        self.tool_call_offset = tool_call_offset
        self.stream_arguments = stream_arguments
        kinds: dict[str, str] = {t: "drop" for t in hidden_tokens if t}
        if thinking:
            kinds.update(_THINK_MARKERS)
        if tools:
            kinds.update(_TOOL_MARKERS)
        else:
            # Tool markers are still never shown; a section still ends reasoning.
            kinds.update({t: ("section_begin" if k == "section_begin" else "drop") for t, k in _TOOL_MARKERS.items()})
        self._kinds = kinds
        self._marker_re = (
            re.compile("|".join(re.escape(t) for t in sorted(kinds, key=lambda s: (-len(s), s)))) if kinds else None
        )
        self._prefixes = {t[:k] for t in kinds for k in range(1, len(t))}
        self._max_hold = max((len(t) - 1 for t in kinds), default=0)

        self._state = _REASONING if thinking else _CONTENT
        self._buf = ""
        self._out: list[dict] = []
        self._inter: list[str] = []
        self._id_parts: list[str] = []
        self._arg_parts: list[str] = []
        self._committed: int | None = None  # index of the call being streamed (stream_arguments)
        self._arg_ws = ""  # trailing whitespace held back while streaming arguments
        self._commit_decided = False
        self._finished = False
        self.result = ParsedOutput()

    # ------------------------------------------------------------------ public API
    def feed(self, delta_text: str) -> list[dict]:
        """Consume newly decoded text; return the deltas it completes (possibly none)."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if delta_text:
            self._buf += delta_text
            self._process(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        """End of output: flush held-back text, degrade an unfinished call to content."""
        if not self._finished:
            self._process(final=True)
            if self._state == _SECTION:
                self._flush_inter()
            elif self._state in (_CALL_ID, _CALL_ARGS):
                if self._committed is not None:
                    self._close_committed()
                else:
                    self._degrade()
            self._state = _CONTENT
            self._finished = True
        return self._take()

    @property
    def num_tool_calls(self) -> int:
        return self.result.num_tool_calls

    # ------------------------------------------------------------------ scanning
    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        for d in out:
            self.result.apply(d)
        return out

    def _holdback(self, text: str) -> int:
        for k in range(min(self._max_hold, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0

    def _process(self, final: bool) -> None:
        buf = self._buf
        pos = 0
        if self._marker_re is not None:
            while True:
                m = self._marker_re.search(buf, pos)
                if m is None:
                    break
                if m.start() > pos:
                    self._text(buf[pos : m.start()])
                self._marker(self._kinds[m.group()], m.group())
                pos = m.end()
        rest = buf[pos:]
        hold = 0 if final else self._holdback(rest)
        if len(rest) > hold:
            self._text(rest[: len(rest) - hold])
        self._buf = rest[len(rest) - hold :] if hold else ""

    # ------------------------------------------------------------------ emission
    def _emit_text(self, key: str, text: str) -> None:
        if not text:
            return
        if self._out and len(self._out[-1]) == 1 and key in self._out[-1]:
            self._out[-1][key] += text
        else:
            self._out.append({key: text})

    def _emit_header(self, call_id: str, name: str) -> int:
        index = self._next_index()
        self._out.append(
            {"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}
        )
        return index

    def _emit_args(self, index: int, text: str) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if last and "tool_calls" in last and last["tool_calls"][0]["index"] == index and "id" not in last["tool_calls"][0]:
            last["tool_calls"][0]["function"]["arguments"] += text
        else:
            self._out.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})

    def _next_index(self) -> int:
        return self.result.num_tool_calls + sum(1 for d in self._out for tc in d.get("tool_calls", ()) if "id" in tc)

    # ------------------------------------------------------------------ text and markers
    def _text(self, text: str) -> None:
        st = self._state
        if st == _REASONING:
            self._emit_text("reasoning_content", text)
        elif st == _CONTENT:
            self._emit_text("content", text)
        elif st == _SECTION:
            self._inter.append(text)
        elif st == _CALL_ID:
            self._id_parts.append(text)
        else:  # _CALL_ARGS
            if self._committed is not None:
                self._stream_args(text)
            else:
                self._arg_parts.append(text)
                if self.stream_arguments and not self._commit_decided:
                    self._maybe_commit()

    def _marker(self, kind: str, marker: str) -> None:
        st = self._state
        if st in (_CALL_ID, _CALL_ARGS) and kind not in _CALL_KINDS:
            # inside a call only the tool-call markers are structure; anything else is argument text
            self._text(marker)
            return
        if kind == "drop":
            return
        if st in (_REASONING, _CONTENT):
            if kind == "think_end":
                self._state = _CONTENT
            elif kind == "think_start":
                self._state = _REASONING
            elif kind == "section_begin":
                self._state = _SECTION if self.tools else _CONTENT
            elif kind == "call_begin":  # a call without a section: open one implicitly
                self._start_call()
        elif st == _SECTION:
            if kind == "call_begin":
                self._flush_inter()
                self._start_call()
            elif kind == "section_end":
                self._flush_inter()
                self._state = _CONTENT
        elif st == _CALL_ID:
            if kind == "arg_begin":
                self._state = _CALL_ARGS
            elif kind == "call_begin":
                self._degrade()
                self._start_call()
            elif kind == "call_end":
                self._degrade()
                self._state = _SECTION
            elif kind == "section_end":
                self._degrade()
                self._state = _CONTENT
        else:  # _CALL_ARGS
            if kind == "call_end":
                self._end_call()
                self._state = _SECTION
            elif kind in ("call_begin", "section_end"):
                # the call never ended: it does not count (unless already streamed)
                if self._committed is not None:
                    self._close_committed()
                else:
                    self._degrade()
                if kind == "call_begin":
                    self._start_call()
                else:
                    self._state = _CONTENT

    # ------------------------------------------------------------------ calls
    def _flush_inter(self) -> None:
        text = "".join(self._inter)
        self._inter = []
        if text.strip():
            self._emit_text("content", text)

    def _start_call(self) -> None:
        self._state = _CALL_ID
        self._id_parts = []
        self._arg_parts = []
        self._committed = None
        self._commit_decided = False
        self._arg_ws = ""

    def _resolve_id(self) -> tuple[str, str] | None:
        parsed = split_call_id("".join(self._id_parts))
        if parsed is None:
            return None
        name, idx = parsed
        if idx is None:
            idx = self.tool_call_offset + self._next_index()
        return tool_call_id(name, idx), name

    def _degrade(self) -> None:
        text = "".join(self._id_parts) + "".join(self._arg_parts)
        self._id_parts, self._arg_parts = [], []
        if text.strip():
            self._emit_text("content", text)

    def _end_call(self) -> None:
        if self._committed is not None:
            self._close_committed()
            return
        resolved = self._resolve_id()
        args = "".join(self._arg_parts).strip()
        if not args:
            args = "{}"
        if resolved is None or not _json_object(args):
            self._degrade()
            return
        call_id, name = resolved
        index = self._emit_header(call_id, name)
        self._emit_args(index, args)
        self._id_parts, self._arg_parts = [], []

    # stream_arguments mode
    def _maybe_commit(self) -> None:
        args = "".join(self._arg_parts).lstrip()
        if not args:
            return
        self._arg_parts = [args]
        self._commit_decided = True
        if not args.startswith("{"):
            return
        resolved = self._resolve_id()
        if resolved is None:
            return
        call_id, name = resolved
        self._committed = self._emit_header(call_id, name)
        self._arg_parts = []
        self._arg_ws = ""
        self._stream_args(args)

    def _stream_args(self, text: str) -> None:
        combined = self._arg_ws + text
        body = combined.rstrip()
        self._arg_ws = combined[len(body) :]
        self._emit_args(self._committed, body)

    def _close_committed(self) -> None:
        self._committed = None
        self._arg_ws = ""
        self._id_parts, self._arg_parts = [], []


# ----------------------------------------------------------------------------------- one-shot


def openai_finish_reason(reason: Optional[str], tool_calls: bool) -> Optional[str]:
    """The engine's finish reason as an OpenAI chat choice reports it (``tool_calls`` when the turn ended with calls)."""
    if reason == "stop" and tool_calls:
        return "tool_calls"
    if reason == "error":
        return "stop"
    return reason


def parse_output(
    text: str,
    thinking: bool = True,
    tools: bool = True,
    *,
    tool_call_offset: int = 0,
    hidden_tokens: Iterable[str] = (),
) -> ParsedOutput:
    """Parse a whole model output (same rules as the streaming parser)."""
    p = StreamingOutputParser(thinking, tools, tool_call_offset=tool_call_offset, hidden_tokens=hidden_tokens)
    p.feed(text)
    p.finish()
    return p.result


def parse_tool_calls(text: str, *, tool_call_offset: int = 0) -> tuple[str, list[dict]]:
    """``(content, tool_calls)`` of an output without reasoning (tool calls in OpenAI form)."""
    r = parse_output(text, thinking=False, tools=True, tool_call_offset=tool_call_offset)
    return r.content, r.tool_calls


def parse_reasoning(text: str, thinking: bool = True) -> tuple[str, str]:
    """``(reasoning_content, rest)``: reasoning ends at ``</think>`` or at a tool-call section.

    ``rest`` is the remaining text as written (tool sections included), ready for
    ``parse_tool_calls``.  With ``thinking=False`` there is no reasoning.
    """
    if not thinking:
        return "", text
    end = text.find(THINK_END)
    sec = min(
        (i for i in (text.find(TOOL_CALLS_SECTION_BEGIN), text.find(TOOL_CALL_SECTION_BEGIN_ALT), text.find(TOOL_CALL_BEGIN)) if i >= 0),
        default=-1,
    )
    if end >= 0 and (sec < 0 or end < sec):
        reasoning, rest = text[:end], text[end + len(THINK_END) :]
    elif sec >= 0:
        reasoning, rest = text[:sec], text[sec:]
    else:
        reasoning, rest = text, ""
    return reasoning.replace(THINK_START, ""), rest
