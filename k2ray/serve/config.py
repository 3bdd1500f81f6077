"""The Serve application's own configuration: ``deploy/*.yaml`` ``args:`` (and the Helm chart's ``serveConfigV2``)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, field_validator

from k2ray.checkpoint.builtin import default_served_name
from k2ray.config import EngineConfig, ParallelConfig


class ServeArgs(BaseModel):
    """Application args of the Ray Serve app (``deploy/*.yaml`` ``args:``, the Helm chart's ``serveConfigV2``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "k2ray-tiny"  # a model directory, or a built-in name: k2ray-tiny (made on first use), k2ray-demo
    served_model_name: Optional[str] = None  # defaults to the model's directory name
    engine: EngineConfig = EngineConfig()
    parallel: ParallelConfig = ParallelConfig(executor="ray")
    api_keys: list[str] = []  # empty: no authentication
    max_queued_requests: int = 256  # per router replica; beyond it requests get 503 at once
    enable_auto_tool_choice: bool = True
    enable_reasoning: bool = True  # thinking models (template knows <think>): think block -> reasoning_content
    default_chat_template_kwargs: dict[str, Any] = {}
    max_request_bytes: int = 4 << 20  # larger request bodies get 413
    default_max_tokens: Optional[int] = None  # when a request sets none: None = up to the context length
    router_cpus: float = 1.0  # bundle 0 of each model group: the K2Router replica (engine loop, scheduler)
    router_gpus: float = 0.0

    @field_validator("max_queued_requests", "max_request_bytes")
    @classmethod
    def _queue_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("default_max_tokens")
    @classmethod
    def _max_tokens_positive(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("router_cpus", "router_gpus")
    @classmethod
    def _router_resources(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must not be negative")
        return v

    @property
    def model_name(self) -> str:
        """The name clients send as ``model``: ``served_model_name``, else the built-in name or directory name."""
        if self.served_model_name:
            return self.served_model_name
        return default_served_name(self.model)
