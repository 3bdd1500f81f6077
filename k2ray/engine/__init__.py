"""The continuous-batching engine: requests, sampling, paged-cache accounting, scheduler, LLMEngine.

Submodules are imported on demand (``k2ray.executor.base`` imports ``k2ray.engine.sampling``, and the engine imports
the executor contract, so this package must not import ``engine`` eagerly).
"""

from __future__ import annotations

_EXPORTS = {
    "LLMEngine": "k2ray.engine.engine",
    "SamplingParams": "k2ray.engine.sampling",
    "Request": "k2ray.engine.request",
    "RequestOutput": "k2ray.engine.request",
    "CompletionOutput": "k2ray.engine.request",
    "PromptTooLongError": "k2ray.engine.request",
    "EngineDeadError": "k2ray.engine.request",
    "Scheduler": "k2ray.engine.scheduler",
    "BlockManager": "k2ray.engine.kv_cache",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'k2ray.engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
