"""k2ray: serve Kimi K2 (DeepSeek-V3 architecture MoE) on Ray.

``from k2ray import LLM, SamplingParams`` is the offline API. Names are resolved lazily so that importing the package
(e.g. for the CLI or config parsing) loads neither torch nor Ray.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from k2ray.llm import LLM

        return LLM
    if name == "SamplingParams":
        from k2ray.runtime.sampling import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from k2ray.engine import request

        return getattr(request, name)
    raise AttributeError(f"module 'k2ray' has no attribute {name!r}")
