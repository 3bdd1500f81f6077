"""k2ray's own log lines: one handler on the ``k2ray`` logger, in every process that serves (ingress, router,
workers), so a person running ``serve run`` sees each milestone and each request once.

``K2RAY_LOG_LEVEL`` (default ``INFO``) sets the level; ``WARNING`` keeps only problems.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s k2ray %(levelname)s %(message)s"


def configure() -> logging.Logger:
    """Attach the k2ray handler once per process (idempotent) and return the ``k2ray`` logger."""
    logger = logging.getLogger("k2ray")
    if not any(getattr(h, "_k2ray", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._k2ray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # Ray's own handlers would print each line a second time
    logger.setLevel(os.environ.get("K2RAY_LOG_LEVEL", "INFO").upper())
    return logger
