"""The Serve application's own configuration: ``deploy/*.yaml`` ``args:`` (and the Helm chart's ``serveConfigV2``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from k2ray.checkpoint.builtin import default_served_name
from k2ray.config import ConfigError, EngineConfig, ParallelConfig, check_resources

KEYS_ENV = "K2RAY_API_KEYS"  # comma- or newline-separated; the Helm chart sets it from a Secret


class ServeArgs(BaseModel):
    """Application args of the Ray Serve app (``deploy/*.yaml`` ``args:``, the Helm chart's ``serveConfigV2``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "k2ray-tiny"  # a model directory, or a built-in name: k2ray-tiny (made on first use), k2ray-demo
    served_model_name: Optional[str] = None  # defaults to the model's directory name
    engine: EngineConfig = EngineConfig()
    parallel: ParallelConfig = ParallelConfig(executor="ray")
    # API keys: these, the lines of api_keys_file and $K2RAY_API_KEYS, merged (resolved_api_keys). None at all: no
    # authentication. A source that is named but yields no key stops the ingress from starting (fail closed).
    api_keys: list[str] = []
    api_keys_file: Optional[str] = None  # one key per line, `#` comments; read by each ingress replica
    max_queued_requests: int = 256  # per router replica; beyond it requests get 503 at once
    enable_auto_tool_choice: bool = True
    enable_reasoning: bool = True  # thinking models (template knows <think>): think block -> reasoning_content
    default_chat_template_kwargs: dict[str, Any] = {}
    max_request_bytes: int = 4 << 20  # larger request bodies get 413
    default_max_tokens: Optional[int] = None  # when a request sets none: None = up to the context length
    router_cpus: float = 1.0  # bundle 0 of each model group: the K2Router replica (engine loop, scheduler)
    router_gpus: float = 0.0
    # The Responses API's stored responses (store: true; previous_response_id, GET/DELETE /v1/responses/{id}): one
    # store per application, shared by the ingress replicas; the oldest goes first when full, each expires ttl after
    # it was stored. Each record holds its whole conversation (input items + output), so size it for memory.
    responses_store_max: int = 4096
    responses_store_ttl_s: float = 3600.0
    # Image input (Kimi K2.5): per request at most max_images image parts, each at most max_image_bytes encoded and
    # max_image_pixels decoded. data: URLs are always accepted; http(s) URLs are fetched when allow_image_urls
    # (timeout image_fetch_timeout_s, image content types only), never from loopback or private addresses unless
    # allow_private_image_urls. Large data: URLs also need max_request_bytes.
    max_images: int = 8
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 40_000_000
    allow_image_urls: bool = True
    allow_private_image_urls: bool = False
    image_fetch_timeout_s: float = 10.0
    # Where the image encoder runs: 0 = in each router replica's process; N > 0 = a VisionEncoder deployment of N
    # replicas (vision_worker_cpus / vision_worker_gpus each, LRU cache of vision_cache_images embeddings each)
    # shared by all model groups. vision_max_workers > vision_workers: Serve autoscales the pool between the two on
    # its own queue (vision_target_ongoing_requests encode calls per replica). vision_worker_resources (custom Ray
    # resources) and vision_worker_node_labels (Ray node labels) pin it to its nodes. Concurrent requests' images
    # are encoded as one batch: up to vision_max_batch_requests requests, waiting at most vision_batch_wait_ms.
    vision_workers: int = 0
    vision_max_workers: int = 0
    vision_target_ongoing_requests: float = 2.0
    vision_worker_cpus: float = 1.0
    vision_worker_gpus: float = 0.0
    vision_worker_resources: dict[str, float] = {}
    vision_worker_node_labels: dict[str, str] = {}
    vision_cache_images: int = 64
    vision_max_batch_requests: int = 8
    vision_batch_wait_ms: float = 5.0

    _keys: Optional[list[str]] = PrivateAttr(None)

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError("a key must not be empty or blank")
        return [k.strip() for k in v]

    @field_validator("max_queued_requests", "max_request_bytes", "responses_store_max", "max_images",
                     "max_image_bytes", "max_image_pixels")
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

    @field_validator("responses_store_ttl_s", "image_fetch_timeout_s")
    @classmethod
    def _ttl_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be greater than 0")
        return v

    @field_validator("router_cpus", "router_gpus", "vision_workers", "vision_max_workers", "vision_worker_cpus",
                     "vision_worker_gpus", "vision_cache_images", "vision_batch_wait_ms")
    @classmethod
    def _router_resources(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must not be negative")
        return v

    @field_validator("vision_max_batch_requests")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("vision_target_ongoing_requests")
    @classmethod
    def _positive_target(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be greater than 0")
        return v

    @field_validator("vision_worker_resources")
    @classmethod
    def _non_negative_vision_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_resources(v)

    @model_validator(mode="after")
    def _vision_pool_bounds(self):
        if self.vision_max_workers and not self.vision_workers:
            raise ValueError("vision_max_workers: an autoscaled image encoder pool needs vision_workers >= 1 (its "
                             "minimum); 0 runs the encoder inside the router replicas")
        if self.vision_max_workers and self.vision_max_workers < self.vision_workers:
            raise ValueError(f"vision_max_workers: {self.vision_max_workers} is below vision_workers "
                             f"({self.vision_workers}): set it to 0 for a fixed pool")
        return self

    def image_limits(self):
        from k2ray.serve.openai.images import ImageLimits

        return ImageLimits(
            max_images=self.max_images, max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
            allow_image_urls=self.allow_image_urls, allow_private_image_urls=self.allow_private_image_urls,
            image_fetch_timeout_s=self.image_fetch_timeout_s,
        )

    @property
    def group_capacity(self) -> int:
        """Requests one model group holds at once: running (``max_num_seqs``) plus waiting (``max_queued_requests``);
        the router, the ingress's admission, the API limits and the edge's cap all count with it."""
        return self.engine.max_num_seqs + self.max_queued_requests

    @property
    def model_name(self) -> str:
        """The name clients send as ``model``: ``served_model_name``, else the built-in name or directory name."""
        if self.served_model_name:
            return self.served_model_name
        return default_served_name(self.model)

    def resolved_api_keys(self) -> list[str]:
        """Every configured key (``api_keys``, ``api_keys_file``, ``$K2RAY_API_KEYS``), resolved once; see
        :func:`resolve_api_keys`."""
        if self._keys is None:
            self._keys = resolve_api_keys(self.api_keys, self.api_keys_file, os.environ)
        return list(self._keys)


def resolve_api_keys(keys: list[str], path: Optional[str], environ: Mapping[str, str]) -> list[str]:
    """The keys of all three sources, merged. Raises :class:`ConfigError` (one line, naming the source) for a source
    that is configured but unreadable or empty: a server meant to have keys must not start without them."""
    out = list(keys)
    if path is not None:
        out += _keys_from_file(path)
    if KEYS_ENV in environ:
        found = [k.strip() for k in environ[KEYS_ENV].replace("\n", ",").split(",") if k.strip()]
        if not found:
            raise ConfigError(f"{KEYS_ENV} is set but holds no key (unset it to run without keys)")
        out += found
    return list(dict.fromkeys(out))


def _keys_from_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"api_keys_file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    keys = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not keys:
        raise ConfigError(f"api_keys_file {path}: no key in it (one key per line, # comments)")
    return keys
