"""Where this worker runs, as Ray sees it (reported by the workers' ``ready()`` and shown in the layout)."""

from __future__ import annotations

import ray


def node_ip() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # not inside a Ray worker
        return "127.0.0.1"


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
