"""``/health`` and the startup announcement: what the model groups say of themselves, answered quickly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from fastapi.responses import JSONResponse

from k2ray.serve.openai.errors import APIError
from k2ray.serve.router_client import ModelGroups

log = logging.getLogger("k2ray.serve.health")

HEALTH_TIMEOUT_S = 0.5  # /health never waits longer for a router (probes often time out after 1 s)


async def health(groups: ModelGroups) -> JSONResponse:
    """200 once a model group serves; otherwise 503 with ``status`` starting / recovering / dead / unreachable,
    within ``HEALTH_TIMEOUT_S`` (a router replica still being created cannot answer: starting)."""
    try:
        st = await asyncio.wait_for(groups.status(), timeout=HEALTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        return _not_ready("starting", "no model group answers yet: the router replica is starting")
    except Exception as e:
        return _not_ready("unreachable", f"model group unreachable: {type(e).__name__}")
    if st.get("state") != "ready":
        detail = f"model group {st.get('group')} is {st.get('state')}"
        return _not_ready(st.get("state") or "unavailable", detail + (f": {st['error']}" if st.get("error") else ""),
                          group=st.get("group"))
    return JSONResponse({"status": "ok", "group": st.get("group")})


def _not_ready(status: str, message: str, group: Optional[str] = None) -> JSONResponse:
    """The state first (``{"status": "starting", ...}``), the OpenAI error shape beside it."""
    err = APIError(503, message, "service_unavailable", None, "model_unavailable").body()
    return JSONResponse({"status": status, "group": group, **err}, status_code=503)


async def announce_when_ready(groups: ModelGroups, model_name: str) -> None:
    """Log once, when a model group first answers ready, the URL the API is served on."""
    while True:
        with contextlib.suppress(Exception):
            st = await asyncio.wait_for(groups.status(), timeout=5)
            if st.get("state") == "ready":
                break
        await asyncio.sleep(1.0)
    url = await asyncio.to_thread(serve_url)
    log.info("serving %s: OpenAI API at %s/v1 (model group %s ready)", model_name, url, st.get("group"))


def serve_url() -> str:
    """Where Serve's HTTP proxy listens (from the Serve controller), e.g. ``http://localhost:8000``."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        if not ray.is_initialized():  # outside Serve (tests): nothing to ask
            return "the Serve HTTP proxy"
        cfg = _get_global_client().http_config
        host = "localhost" if cfg.host in ("0.0.0.0", "::", "127.0.0.1") else cfg.host
        return f"http://{host}:{cfg.port}{(cfg.root_path or '').rstrip('/')}"
    except Exception:  # an older or newer Serve: the line still says what is ready
        return "the Serve HTTP proxy"
