"""What other threads send to the engine's step thread (its inbox), and how outputs travel back to a stream.

While streams are open one background thread owns the scheduler; every other thread only appends an :class:`Add` or
an :class:`Abort` to the inbox and wakes it. Outputs go back through each stream's :class:`Sink`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from k2ray.engine.request import Request


class Sink:
    """Delivers outputs (or the exception that ends the stream) from the step thread to one stream's asyncio queue."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def put(self, item) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's loop is closed
            return False


@dataclass(frozen=True)
class Add:
    """Queue a prepared request; its outputs go to ``sink`` (None: a request added without a stream)."""

    request: Request
    sink: Optional[Sink] = None


@dataclass(frozen=True)
class Abort:
    """Stop a request and free its cache blocks (its stream, if any, gets the final output)."""

    request_id: str


Message = Add | Abort
