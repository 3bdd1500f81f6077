"""One access line per HTTP request: method, path, status, prompt and completion tokens, time to first token and
total time (measured until the last byte of a stream is sent).

The middleware opens a record per request in a context variable; the endpoints add what only they know
(:func:`note_prompt`, :func:`note_tokens`). ``/health`` is not logged: probes call it every few seconds.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Optional

log = logging.getLogger("k2ray.access")

_current: ContextVar[Optional[dict]] = ContextVar("k2ray_access_record", default=None)
_QUIET_PATHS = frozenset({"/health"})


def note_prompt(n_tokens: int) -> None:
    rec = _current.get()
    if rec is not None:
        rec["prompt"] = rec.get("prompt", 0) + n_tokens


def note_tokens(n_tokens: int) -> None:
    """``n_tokens`` more generated tokens; the first call that brings any sets the time to first token."""
    rec = _current.get()
    if rec is not None and n_tokens:
        rec.setdefault("ttft", time.monotonic() - rec["t0"])
        rec["completion"] = rec.get("completion", 0) + n_tokens


def format_line(method: str, path: str, rec: dict) -> str:
    parts = [method, path, str(rec.get("status", "-"))]
    if "prompt" in rec or "completion" in rec:
        parts.append(f"prompt_tokens={rec.get('prompt', 0)} completion_tokens={rec.get('completion', 0)}")
    if "ttft" in rec:
        parts.append(f"ttft={rec['ttft']:.3f}s")
    parts.append(f"total={rec['total']:.3f}s")
    return " ".join(parts)


class AccessLogMiddleware:
    """Pure ASGI middleware (streams pass through untouched; the line is written after their last chunk)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in _QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        rec: dict = {"t0": time.monotonic()}
        token = _current.set(rec)

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                rec["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            _current.reset(token)
            rec["total"] = time.monotonic() - rec["t0"]
            if "status" not in rec:
                rec["status"] = "disconnected"
            log.info("%s", format_line(scope.get("method", "-"), scope.get("path", "-"), rec))
