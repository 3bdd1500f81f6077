"""Who this ingress replica is (inside Serve), and the ``x-k2ray-replica`` header naming it on every answer, so a
client (or a test) can tell which replica served a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

HEADER = b"x-k2ray-replica"


@dataclass(frozen=True)
class ReplicaIdentity:
    app_name: str
    replica_id: str
    namespace: str


def identity() -> Optional[ReplicaIdentity]:
    """This Serve replica's application, id and Ray namespace; ``None`` outside a Serve replica."""
    try:
        import ray
        from ray import serve

        ctx = serve.get_replica_context()
        return ReplicaIdentity(ctx.app_name, ctx.replica_id.unique_id, ray.get_runtime_context().namespace)
    except Exception:  # RayServeException: not in a replica
        return None


class ReplicaHeaderMiddleware:
    """Pure ASGI middleware: adds ``x-k2ray-replica: <replica id>`` to every response (streams pass untouched)."""

    def __init__(self, app, replica_id: str):
        self.app, self.value = app, replica_id.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)
