"""Where stored Responses-API responses live (``store: true``), so that ``GET /v1/responses/{id}``,
``DELETE /v1/responses/{id}`` and ``previous_response_id`` work whichever ingress replica answers.

* :class:`ResponseStore` — the data logic, pure: a bounded (``max_entries``, oldest first out) map with a TTL.
* :class:`ResponseStoreActor` — a thin Ray actor around it, ONE per Serve application, shared by every ingress
  replica. It is a named, *detached* actor in the replicas' namespace, created get-if-exists by whichever replica needs
  it first: detached so that it outlives the replica that happened to create it (a non-detached actor dies with its
  owner, and ingress replicas come and go with autoscaling). Being detached, nothing would ever delete it, so it
  watches the application itself (Serve's status, every ``WATCH_PERIOD_S``) and exits once the application is
  deleted or Serve is gone: ``serve.delete`` / ``serve shutdown`` leave nothing behind.
* :class:`ActorStoreClient` / :class:`LocalStoreClient` — the async interface the ingress uses; the local one (an
  in-process store) is for an ingress running outside Serve (unit tests with FastAPI's TestClient).

A record is ``{"response": the response object, "items": the conversation's input items up to this response}``:
a follow-up with ``previous_response_id`` continues from ``items + response["output"]``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

log = logging.getLogger("k2ray.serve.response_store")

WATCH_PERIOD_S = 10.0  # how often the actor checks that its application still exists
WATCH_FAILURES = 3  # consecutive failures to reach Serve's controller before the actor gives up


class ResponseStore:
    """At most ``max_entries`` records, each kept ``ttl_s`` seconds after it was stored; when full, the oldest goes."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # id -> (stored at, record), oldest first
        self._clock = clock
        self.configure(max_entries, ttl_s)

    def configure(self, max_entries: int, ttl_s: float) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError(f"max_entries must be >= 1 and ttl_s > 0 (got {max_entries}, {ttl_s})")
        self.max_entries, self.ttl_s = int(max_entries), float(ttl_s)
        self._expire()

    def _expire(self) -> None:
        now = self._clock()
        while self._data:
            key, (t, _) = next(iter(self._data.items()))
            if now - t < self.ttl_s:
                break
            del self._data[key]
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def put(self, key: str, record: Any) -> None:
        self._data.pop(key, None)
        self._data[key] = (self._clock(), record)
        self._expire()

    def get(self, key: str) -> Optional[Any]:
        self._expire()
        hit = self._data.get(key)
        return None if hit is None else hit[1]

    def delete(self, key: str) -> bool:
        self._expire()
        return self._data.pop(key, None) is not None

    def __len__(self) -> int:
        self._expire()
        return len(self._data)


# -- the clients the ingress uses ---------------------------------------------------------------------------------------
class LocalStoreClient:
    """An in-process store (one ingress outside Serve: tests). Never used by a Serve replica."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.store = ResponseStore(max_entries, ttl_s)

    async def put(self, key: str, record: dict) -> None:
        self.store.put(key, record)

    async def get(self, key: str) -> Optional[dict]:
        return self.store.get(key)

    async def delete(self, key: str) -> bool:
        return self.store.delete(key)


def actor_name(app_name: str) -> str:
    return f"k2ray-response-store:{app_name}"


class ActorStoreClient:
    """The application's shared store actor, looked up (or created) by name; a handle to an actor that died is
    replaced once by a fresh lookup (a new, empty store)."""

    def __init__(self, app_name: str, namespace: str, max_entries: int, ttl_s: float):
        self.app_name, self.namespace = app_name, namespace
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._handle = None

    def _actor(self):
        if self._handle is None:
            import ray

            cls = ray.remote(ResponseStoreActor)
            for attempt in range(5):
                try:
                    self._handle = cls.options(
                        name=actor_name(self.app_name), namespace=self.namespace, lifetime="detached",
                        get_if_exists=True, num_cpus=0, max_restarts=0,
                    ).remote(self.app_name, self.max_entries, self.ttl_s)
                    break
                except ValueError:  # two replicas created it at the same moment: the other one won; look again
                    if attempt == 4:
                        raise
                    time.sleep(0.1)
            # The store keeps the limits of the replica that created it; a redeploy with other limits applies them.
            self._handle.configure.remote(self.max_entries, self.ttl_s)
        return self._handle

    async def _call(self, method: str, *args):
        from ray.exceptions import RayActorError

        for attempt in (0, 1):
            # the first lookup (or creation) is a blocking call to Ray's GCS: off the event loop
            handle = self._handle or await asyncio.to_thread(self._actor)
            try:
                return await getattr(handle, method).remote(*args)
            except RayActorError:
                self._handle = None
                if attempt:
                    raise

    async def put(self, key: str, record: dict) -> None:
        await self._call("put", key, record)

    async def get(self, key: str) -> Optional[dict]:
        return await self._call("get", key)

    async def delete(self, key: str) -> bool:
        return await self._call("delete", key)


class ResponseStoreActor:
    """The Ray actor (decorated with ``ray.remote`` where it is created): the store, and a watcher thread that ends
    the actor once its Serve application is gone."""

    def __init__(self, app_name: str, max_entries: int, ttl_s: float, watch: bool = True):
        self.app_name = app_name
        self.store = ResponseStore(max_entries, ttl_s)
        self._lock = threading.Lock()
        if watch:
            threading.Thread(target=self._watch, name="k2ray-store-watch", daemon=True).start()

    def configure(self, max_entries: int, ttl_s: float) -> None:
        with self._lock:
            self.store.configure(max_entries, ttl_s)

    def put(self, key: str, record: dict) -> None:
        with self._lock:
            self.store.put(key, record)

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            return self.store.get(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self.store.delete(key)

    def size(self) -> int:
        with self._lock:
            return len(self.store)

    def _app_alive(self) -> bool:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        return app is not None and str(getattr(app.status, "value", app.status)) != "DELETING"

    def _watch(self) -> None:
        import ray

        failures = 0
        while True:
            time.sleep(WATCH_PERIOD_S)
            try:
                alive = self._app_alive()
                failures = 0
            except Exception as e:  # the controller is restarting, or Serve was shut down
                failures += 1
                log.warning("response store: cannot read Serve's status (%s/%s): %s", failures, WATCH_FAILURES, e)
                alive = failures < WATCH_FAILURES
            if not alive:
                log.info("response store: application %r is gone; exiting", self.app_name)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
