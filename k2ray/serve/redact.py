"""What ``/v1/k2ray/layout`` and ``/v1/k2ray/stats`` show to whom.

With API keys on, both need a key (the ingress' key dependency) and show everything. With no key configured the
endpoints stay open, so a client that is not local gets them redacted: the layout keeps its shape (worker counts,
ranks, the experts each shard holds, state) without node ids, node IPs or process ids, and the stats keep only the
top-level counters. A local client (loopback, not forwarded by a proxy) is the operator on the machine and sees
everything."""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.requests import Request

# Allowlists, so a field added to the layout or the stats later stays hidden until someone decides it may show.
LAYOUT_KEYS = frozenset({"model", "group", "state", "executor", "device", "backend", "strategy", "parallel",
                         "attention_workers", "expert_shards"})
WORKER_KEYS = frozenset({"rank", "shard", "experts"})
STATS_LABELS = frozenset({"group", "state"})
# A proxy on the same host (nginx, a sidecar) makes every client look local; these headers give it away.
FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")


def full_view(request: Request) -> bool:
    """Whether this request may see node addresses, process ids and per-worker internals."""
    if request.app.state.api_keys:  # keys on: the key dependency already let this request in
        return True
    if any(h in request.headers for h in FORWARDED):
        return False
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # no peer address (e.g. a unix socket or an in-process test client): not known to be local
        return False


def layout(lay: dict[str, Any]) -> dict[str, Any]:
    """The layout without node ids, node IPs or process ids; counts, expert lists and state stay."""
    out: dict[str, Any] = {}
    for k, v in lay.items():
        if k not in LAYOUT_KEYS:
            continue
        if isinstance(v, list):
            v = [{f: x for f, x in w.items() if f in WORKER_KEYS} if isinstance(w, dict) else w for w in v]
        elif isinstance(v, dict):
            v = {f: x for f, x in v.items() if isinstance(x, (str, int, float, bool)) or x is None}
        out[k] = v
    return out


def stats(st: dict[str, Any]) -> dict[str, Any]:
    """Only the top-level counters (running, waiting, KV blocks, finished, aborted, ...) and the group's state: no
    error text, per-worker usage, phase timings or last-step details."""
    return {k: v for k, v in st.items() if k in STATS_LABELS or isinstance(v, (int, float))}
