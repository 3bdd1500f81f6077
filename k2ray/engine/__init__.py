"""The continuous-batching engine: requests, paged-cache accounting, scheduler, structured outputs, LLMEngine.

A step is schedule (``scheduler``, ``work``) -> execute (the executor) -> update (``output_processor``, ``stop``);
``input_processor`` validates requests, ``loop`` and ``messages`` are the background thread behind ``stream()``.
"""

from __future__ import annotations

from k2ray.engine.engine import LLMEngine
from k2ray.engine.kv_cache import BlockManager
from k2ray.engine.request import CompletionOutput, EngineDeadError, PromptTooLongError, Request, RequestOutput
from k2ray.engine.scheduler import Scheduler
from k2ray.runtime.sampling import SamplingParams

__all__ = ["LLMEngine", "SamplingParams", "Request", "RequestOutput", "CompletionOutput", "PromptTooLongError",
           "EngineDeadError", "Scheduler", "BlockManager"]
