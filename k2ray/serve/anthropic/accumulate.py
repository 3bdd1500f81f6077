"""The Messages accumulator: wraps the chat one (:class:`~k2ray.serve.openai.accumulate.ChatAccumulator`, which
parses the model's output into reasoning, content and tool-call deltas and counts the tokens) and turns its deltas
into Anthropic's content blocks and stream events. The final message is built from the same block state the events
were made from, so a streamed and a non-streamed request agree by construction.

Stream: ``message_start`` (with the first engine chunk, which carries the prompt's prefix-cache hits) and ``ping``;
per block ``content_block_start`` / ``content_block_delta`` ... / ``content_block_stop`` (a thinking block gets its
``signature_delta`` right before its stop); ``message_delta`` (stop reason, usage) and ``message_stop`` when the
stream closes; an ``error`` event instead when it failed after the 200 went out. Blocks: reasoning -> ``thinking``;
content -> ``text``, opened only once it has non-whitespace text (whitespace between thinking and tool calls is
dropped); each tool call -> ``tool_use`` with a fresh ``toolu_`` id, its arguments sent as ``input_json_delta``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Optional

from k2ray.serve.anthropic import errors as E
from k2ray.serve.anthropic import protocol as A
from k2ray.serve.openai.accumulate import ChatAccumulator
from k2ray.serve.openai.chat import ChatPlan
from k2ray.serve.openai.errors import APIError
from k2ray.serve.wire import GenerateChunk

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def signature(thinking: str) -> str:
    """The thinking block's opaque signature: a digest of its text (input signatures are never checked)."""
    return base64.b64encode(hashlib.sha256(b"k2ray-thinking\0" + thinking.encode("utf-8")).digest()).decode()


def _input(args: str) -> dict:
    try:
        value = json.loads(args or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class _Block:
    """A content block being built: its kind and text pieces (thinking, text or tool arguments)."""

    def __init__(self, kind: str, call_id: str = "", name: str = ""):
        self.kind, self.call_id, self.name = kind, call_id, name
        self.index = -1  # its place in the message, set when it opens
        self.parts: list[str] = []
        self.signature = ""

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def model(self) -> A.ContentBlock:
        if self.kind == "thinking":
            return A.ThinkingBlock(thinking=self.text, signature=self.signature)
        if self.kind == "text":
            return A.TextBlock(text=self.text)
        return A.ToolUseBlock(id=self.call_id, name=self.name, input=_input(self.text))


class MessagesAccumulator:
    def __init__(self, plan: ChatPlan, request_id: str, model: str, tokenizer,
                 stop_sequences: Optional[list[str]] = None):
        self.chat = ChatAccumulator(plan, 1, request_id, model, int(time.time()), tokenizer)
        self.id, self.model = request_id, model
        self.stop_sequences = frozenset(stop_sequences or ())
        self.blocks: list[_Block] = []
        self._open: Optional[_Block] = None
        self._pending = ""  # content that is whitespace so far, not yet in a text block
        self._calls: dict[int, int] = {}  # the chat's tool-call index -> block index
        self._started = False
        self.stop_reason: Optional[str] = None
        self.stop_sequence: Optional[str] = None

    # -- the accumulator interface (k2ray.serve.responses) -------------------------------------------------------
    @property
    def finish_reason(self) -> Optional[str]:
        """The chat's finish reason (the metrics label the same values for every API)."""
        return self.chat.finish_reason

    def start(self) -> list[A.StreamEvent]:
        return []  # message_start waits for the first engine chunk (prefix-cache hits); it is there at once

    def add(self, prompt_index: int, chunk: GenerateChunk) -> list[A.StreamEvent]:
        chunks = self.chat.add(prompt_index, chunk)
        events = self._start_events()
        for c in chunks:
            ch = c.choices[0]
            events += self._delta(ch.delta)
            if ch.finish_reason is not None:
                events += self._finish(ch.finish_reason, ch.stop_reason)
        return events

    def encode(self, event, include_usage: bool = False) -> str:
        return A.sse_event(event)

    def close(self, include_usage: bool = False, error: Optional[APIError] = None) -> list[str]:
        if error is not None:
            return [A.sse("error", E.body(error))]
        events = self._start_events() + self._close_block()
        events.append(A.MessageDeltaEvent(
            delta=A.MessageDelta(stop_reason=self.stop_reason or "end_turn", stop_sequence=self.stop_sequence),
            usage=self.usage()))
        events.append(A.MessageStopEvent())
        return [self.encode(e) for e in events]

    def usage(self) -> A.Usage:
        u = self.chat.usage()
        cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        return A.Usage(input_tokens=u.prompt_tokens - cached, output_tokens=u.completion_tokens,
                       cache_read_input_tokens=cached)

    def response(self) -> A.Message:
        self._close_block()
        return A.Message(id=self.id, model=self.model, content=[b.model() for b in self.blocks],
                         stop_reason=self.stop_reason or "end_turn", stop_sequence=self.stop_sequence,
                         usage=self.usage())

    # -- chat deltas -> blocks and events ------------------------------------------------------------------------
    def _start_events(self) -> list:
        if self._started:
            return []
        self._started = True
        u = self.usage()
        u.output_tokens = 0
        return [A.MessageStartEvent(message=A.Message(id=self.id, model=self.model, usage=u)), A.PingEvent()]

    def _open_block(self, block: _Block, start: A.ContentBlock) -> list:
        block.index = len(self.blocks)
        self.blocks.append(block)
        self._open = block
        return [A.ContentBlockStartEvent(index=block.index, content_block=start)]

    def _close_block(self) -> list:
        block, self._open = self._open, None
        if block is None:
            return []
        events: list = []
        if block.kind == "thinking":
            block.signature = signature(block.text)
            events.append(A.ContentBlockDeltaEvent(index=block.index,
                                                   delta=A.SignatureDelta(signature=block.signature)))
        events.append(A.ContentBlockStopEvent(index=block.index))
        return events

    def _append(self, block: _Block, text: str, delta) -> list:
        block.parts.append(text)
        return [A.ContentBlockDeltaEvent(index=block.index, delta=delta)]

    def _delta(self, d: dict) -> list:
        events: list = []
        if d.get("reasoning_content"):
            text = d["reasoning_content"]
            if self._open is None or self._open.kind != "thinking":
                events += self._close_block()
                events += self._open_block(_Block("thinking"), A.ThinkingBlock(thinking="", signature=""))
            events += self._append(self._open, text, A.ThinkingDelta(thinking=text))
        if d.get("content"):
            text = d["content"]
            if self._open is not None and self._open.kind == "text":
                events += self._append(self._open, text, A.TextDelta(text=text))
            else:
                self._pending += text
                if self._pending.strip():
                    text, self._pending = self._pending, ""
                    events += self._close_block()
                    events += self._open_block(_Block("text"), A.TextBlock(text=""))
                    events += self._append(self._open, text, A.TextDelta(text=text))
        for tc in d.get("tool_calls", ()):
            fn = tc.get("function") or {}
            if "id" in tc:  # a call's header: a new tool_use block
                events += self._close_block()
                self._pending = ""
                block = _Block("tool_use", A.random_id("toolu"), fn.get("name", ""))
                events += self._open_block(block, A.ToolUseBlock(id=block.call_id, name=block.name, input={}))
                self._calls[tc["index"]] = block.index
            if fn.get("arguments") and tc["index"] in self._calls:
                block = self.blocks[self._calls[tc["index"]]]
                events += self._append(block, fn["arguments"], A.InputJsonDelta(partial_json=fn["arguments"]))
        return events

    def _finish(self, finish_reason: str, stop_reason) -> list:
        self._pending = ""
        self.stop_reason = _STOP_REASONS.get(finish_reason, "end_turn")
        if self.stop_reason == "end_turn" and isinstance(stop_reason, str) and stop_reason in self.stop_sequences:
            self.stop_reason, self.stop_sequence = "stop_sequence", stop_reason
        return self._close_block()
