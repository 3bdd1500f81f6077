"""The next routing table's state, prepared in a background thread while the worker keeps stepping.

A live rebalance (EPLB) stages on every worker what the new table needs (an expert shard: the newly assigned expert
weights; an attention worker: the lookup tables), then switches all of them at one step boundary. Staging never runs
on the step path, so no step waits for it; the worker reports the staged version with each step's stats and the
executor sends the switch once every worker has it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class Stager:
    def __init__(self):
        self._lock = threading.Lock()
        self._wanted: int | None = None
        self._ready: tuple[int, Any] | None = None
        self.error: str | None = None

    def start(self, version: int, build: Callable[[], Any]) -> None:
        """Build the state of ``version`` in the background; a newer start supersedes an older one."""
        with self._lock:
            self._wanted, self._ready, self.error = version, None, None
        threading.Thread(target=self._run, args=(version, build), name=f"k2ray-stage-{version}", daemon=True).start()

    def _run(self, version: int, build: Callable[[], Any]) -> None:
        try:
            value = build()
        except Exception as e:  # reported to the executor with the next step, which abandons the rebalance
            log.exception("staging placement version %d failed", version)
            with self._lock:
                if self._wanted == version:
                    self.error = f"{type(e).__name__}: {e}"
            return
        with self._lock:
            if self._wanted == version:
                self._ready = (version, value)

    def report(self) -> dict:
        """What goes into a step's stats: the version staged and ready (or None), and a staging error."""
        with self._lock:
            return {"staged": self._ready[0] if self._ready else None, "stage_error": self.error}

    def take(self, version: int) -> Any:
        """The staged state of ``version`` (the switch); it is an error to switch to what is not staged."""
        with self._lock:
            if self._ready is None or self._ready[0] != version:
                raise RuntimeError(f"placement version {version} is not staged on this worker")
            value = self._ready[1]
            self._wanted, self._ready = None, None
            return value
