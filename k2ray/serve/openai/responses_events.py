"""OpenAI's Responses API, the answer side: the chat accumulator's deltas re-shaped into Responses output items and
stream events.

:class:`ResponsesAccumulator` wraps a :class:`~k2ray.serve.openai.accumulate.ChatAccumulator` (one choice) and keeps
the contract of :mod:`k2ray.serve.responses` (``start`` / ``add`` / ``encode`` / ``close`` / ``response`` /
``finish_reason``). Each chat delta opens, extends or closes an output item:

* ``reasoning_content`` -> a ``reasoning`` item (``content: [{type: reasoning_text}]``; with ``reasoning.summary``
  requested, the same text as its ``summary`` too: K2 writes no separate summary),
* ``content`` -> a ``message`` item (one ``output_text`` part; whitespace alone between the think block and a tool
  call opens no message),
* a tool-call header and its arguments -> a ``function_call`` item (``call_id`` is Kimi's ``functions.NAME:IDX``).

The output items are built from the events' own state, so a streamed answer reassembles to the non-streamed one by
construction. Events are SSE ``event: <type>`` / ``data: <json>`` with a ``sequence_number`` from 0; the stream ends
with ``response.completed``, ``response.incomplete`` (``max_output_tokens``) or ``response.failed`` (no ``[DONE]``).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any, Optional

from pydantic import RootModel

from k2ray.serve.openai.accumulate import ChatAccumulator
from k2ray.serve.openai.errors import APIError
from k2ray.serve.openai.responses_api import ResponsesTurn, new_id
from k2ray.serve.wire import GenerateChunk

Event = dict[str, Any]


def _error_code(e: APIError) -> str:
    """``response.error.code`` takes OpenAI's fixed set of values."""
    if e.status == 429 or e.code == "overloaded":
        return "rate_limit_exceeded"
    if e.status == 400:
        return "invalid_prompt"
    return "server_error"


class ResponsesAccumulator:
    def __init__(self, chat_acc: ChatAccumulator, turn: ResponsesTurn, response_id: str, model: str):
        self.chat, self.turn, self.id, self.model = chat_acc, turn, response_id, model
        self.output: list[dict[str, Any]] = []
        self._open: Optional[dict[str, Any]] = None  # the item being streamed
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item
        self._ws = ""  # whitespace content held back until text follows (or dropped before a tool call)
        self._seq = 0
        self._chat_finish: Optional[str] = None
        self.error: Optional[APIError] = None
        self.completed_at: Optional[int] = None

    # -- events ------------------------------------------------------------------------------------------------------
    def _ev(self, type_: str, **fields) -> Event:
        ev = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return ev

    def _item_ev(self, type_: str, item: dict, **fields) -> Event:
        return self._ev(type_, item_id=item["id"], output_index=item["_index"], **fields)

    def encode(self, event: Event, include_usage: bool = False) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def start(self) -> list[Event]:
        return [self._ev("response.created", response=self.snapshot()),
                self._ev("response.in_progress", response=self.snapshot())]

    def add(self, prompt_index: int, chunk: GenerateChunk) -> list[Event]:
        out: list[Event] = []
        for c in self.chat.add(prompt_index, chunk):
            for ch in c.choices:
                out += self._delta(ch.delta)
                if ch.finish_reason is not None:
                    out += self._finish(ch.finish_reason)
        return out

    def close(self, include_usage: bool = False, error: Optional[APIError] = None) -> list[str]:
        if error is not None:
            self.error = error
            for item in self.output:
                if item["status"] == "in_progress":
                    item["status"] = "incomplete"
            self._open = None
        kind = {"failed": "response.failed", "incomplete": "response.incomplete"}.get(self.status,
                                                                                     "response.completed")
        return [self.encode(self._ev(kind, response=self.snapshot()))]

    # -- the items ---------------------------------------------------------------------------------------------------
    def _add_item(self, item: dict[str, Any]) -> list[Event]:
        out = self._close_open()
        item["_index"] = len(self.output)
        self.output.append(item)
        self._open = item
        out.append(self._ev("response.output_item.added", output_index=item["_index"], item=_public(item)))
        if item["type"] == "message":
            out.append(self._item_ev("response.content_part.added", item, content_index=0,
                                     part=_text_part("")))
        return out

    def _delta(self, d: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        if d.get("reasoning_content"):
            it = self._open
            if it is None or it["type"] != "reasoning":
                out += self._add_item({"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [],
                                       "status": "in_progress", "_text": []})
                it = self._open
            it["_text"].append(d["reasoning_content"])
            out.append(self._item_ev("response.reasoning_text.delta", it, content_index=0,
                                     delta=d["reasoning_content"]))
        if d.get("content"):
            out += self._content(d["content"])
        for tc in d.get("tool_calls", ()):
            if "id" in tc:  # a call's header: a new item
                self._ws = ""
                out += self._add_item({"type": "function_call", "id": new_id("fc"), "call_id": tc["id"],
                                       "name": tc["function"]["name"], "arguments": "", "status": "in_progress",
                                       "_text": []})
                self._calls[tc["index"]] = self._open
            args = tc.get("function", {}).get("arguments")
            if args:
                it = self._calls[tc["index"]]
                it["_text"].append(args)
                out.append(self._item_ev("response.function_call_arguments.delta", it, delta=args))
        return out

    def _content(self, text: str, force: bool = False) -> list[Event]:
        out: list[Event] = []
        it = self._open
        if it is None or it["type"] != "message":
            if not force and not text.strip():
                self._ws += text
                return out
            text, self._ws = self._ws + text, ""
            out += self._add_item({"type": "message", "id": new_id("msg"), "role": "assistant", "content": [],
                                   "status": "in_progress", "_text": []})
            it = self._open
        it["_text"].append(text)
        out.append(self._item_ev("response.output_text.delta", it, content_index=0, delta=text, logprobs=[]))
        return out

    def _finish(self, reason: str) -> list[Event]:
        self._chat_finish = reason
        status = "incomplete" if reason == "length" else "completed"
        out = []
        if self._ws and not any(i["type"] in ("message", "function_call") for i in self.output):
            out = self._content("", force=True)  # the answer was whitespace alone: still the answer
        self.completed_at = int(time.time())
        return out + self._close_open(status)

    def _close_open(self, status: str = "completed") -> list[Event]:
        it, self._open = self._open, None
        if it is None:
            return []
        it["status"] = status
        text = "".join(it["_text"])
        out: list[Event] = []
        if it["type"] == "reasoning":
            it["content"] = [{"type": "reasoning_text", "text": text}]
            out.append(self._item_ev("response.reasoning_text.done", it, content_index=0, text=text))
            if self.turn.summary:
                part = {"type": "summary_text", "text": text}
                it["summary"] = [part]
                out += [self._item_ev("response.reasoning_summary_part.added", it, summary_index=0,
                                      part={"type": "summary_text", "text": ""}),
                        self._item_ev("response.reasoning_summary_text.delta", it, summary_index=0, delta=text),
                        self._item_ev("response.reasoning_summary_text.done", it, summary_index=0, text=text),
                        self._item_ev("response.reasoning_summary_part.done", it, summary_index=0, part=part)]
        elif it["type"] == "message":
            it["content"] = [_text_part(text)]
            out += [self._item_ev("response.output_text.done", it, content_index=0, text=text, logprobs=[]),
                    self._item_ev("response.content_part.done", it, content_index=0, part=_text_part(text))]
        else:
            it["arguments"] = text
            out.append(self._item_ev("response.function_call_arguments.done", it, arguments=text))
        out.append(self._ev("response.output_item.done", output_index=it["_index"], item=_public(it)))
        return out

    # -- the response object ---------------------------------------------------------------------------------------
    @property
    def finish_reason(self) -> Optional[str]:
        return self.chat.finish_reason

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self._chat_finish is None:
            return "in_progress"
        return "incomplete" if self._chat_finish == "length" else "completed"

    def usage(self) -> dict[str, Any]:
        u = self.chat.usage()
        details = getattr(u, "completion_tokens_details", None)
        reasoning = getattr(details, "reasoning_tokens", None)
        if reasoning is None and isinstance(details, dict):
            reasoning = details.get("reasoning_tokens")
        cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning or 0},
                "total_tokens": u.total_tokens}

    def snapshot(self) -> dict[str, Any]:
        """The response object as it stands (``usage`` once it ended)."""
        status = self.status
        err = None
        if self.error is not None:
            err = {"code": _error_code(self.error), "message": self.error.message}
        return {
            "id": self.id, "object": "response", "created_at": self.turn.created_at, "status": status,
            "completed_at": self.completed_at if status == "completed" else None,
            "error": err,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": [_public(i) for i in self.output],
            **copy.deepcopy(self.turn.echo),
            "usage": self.usage() if status in ("completed", "incomplete", "failed") else None,
        }

    def response(self) -> RootModel:
        return RootModel[dict[str, Any]](self.snapshot())

    def record(self) -> dict[str, Any]:
        """What the store keeps: the response and the conversation's items up to it."""
        return {"response": self.snapshot(), "items": self.turn.items}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """An item without its private bookkeeping (``_index``, ``_text``), as a fresh copy."""
    return copy.deepcopy({k: v for k, v in item.items() if not k.startswith("_")})
