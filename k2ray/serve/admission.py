"""Fast refusal: whether the model groups can take one more generation request is decided before the request is
read, parsed, templated or tokenized, so a full server answers 503 in milliseconds.

The ingress counts the generation requests it has in flight and compares them with what the model groups it has
seen hold: ``max_num_seqs + max_queued_requests`` per ready group (groups are seen through the ``/health`` status
polls of :class:`GroupWatch` and through the chunks they answer with). With one ingress replica the count is exact;
with several, each admits up to the groups' capacity and the router's own bound (``max_queued_requests``) refuses the
rest after tokenization. A request asking ``n`` sequences counts once here; the router counts sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from k2ray.serve.anthropic.errors import response_for_path
from k2ray.serve.openai.errors import unavailable
from k2ray.serve.router_client import ModelGroups

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"})
SEEN_FOR_S = 15.0  # a group not seen ready for this long no longer counts


class GroupWatch:
    """The ready model groups, as their status answers and chunks show them."""

    def __init__(self) -> None:
        self._ready: dict[str, float] = {}

    def saw(self, group: str | None, ready: bool = True) -> None:
        if not group:
            return
        if ready:
            self._ready[group] = time.monotonic()
        else:
            self._ready.pop(group, None)

    @property
    def num_ready(self) -> int:
        now = time.monotonic()
        for g in [g for g, t in self._ready.items() if now - t > SEEN_FOR_S]:
            del self._ready[g]
        return len(self._ready)

    async def poll(self, groups: ModelGroups, interval_s: float = 0.5) -> None:
        """Runs for the ingress's lifetime (each status call reaches one group, Serve picks which)."""
        while True:
            with contextlib.suppress(Exception):
                st = await asyncio.wait_for(groups.status(), timeout=2)
                self.saw(st.get("group"), st.get("state") == "ready")
            await asyncio.sleep(interval_s)


class AdmissionMiddleware:
    """Pure ASGI middleware in front of the generation endpoints: over capacity -> 503 ``overloaded`` (Anthropic's
    529 ``overloaded_error`` on ``/v1/messages``) with ``Retry-After`` at once; otherwise the request holds a slot
    until its response (stream included) is done."""

    def __init__(self, app, watch: GroupWatch, per_group: int):
        self.app, self.watch, self.per_group = app, watch, per_group
        self.inflight = 0

    @property
    def capacity(self) -> int:
        return self.per_group * max(1, self.watch.num_ready)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.capacity:
            err = unavailable(f"server overloaded: {self.inflight} requests in flight, the model groups hold "
                              f"{self.capacity}; retry later", "overloaded")
            await response_for_path(scope["path"], err)(scope, receive, send)  # in the path's API shape
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
