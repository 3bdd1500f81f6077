"""VisionEncoder: Kimi K2.5's image encoder as a pool of its own (``vision_workers`` in the Serve args).

A thin shell over :class:`~k2ray.runtime.vision.VisionRunner`; ``k2ray.serve.app`` makes it the ``VisionEncoder``
Serve deployment (``num_replicas = vision_workers``), whose handle every model group's router shares: a router
sends a request's preprocessed images when it prepares the request and gets the embeddings back through the object
store; they then travel to the attention workers with the step's per-sequence input, never per layer. Each replica
keeps an LRU cache of embeddings keyed by image content hash and counts ``k2ray_vision_images_encoded_total``.
Concurrent calls are batched (``serve.batch``): the images of up to ``max_batch_requests`` requests go through the
encoder as one batch.
"""

from __future__ import annotations

import asyncio
import logging
import os

import torch
from ray import serve

from k2ray import logs, metrics
from k2ray.checkpoint.builtin import resolve_model
from k2ray.config import ModelArgs
from k2ray.runtime.vision import VisionRunner

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VisionEncoder:
    def __init__(self, model: str, model_name: str, dtype: str = "float32", device: str = "cpu",
                 cache_images: int = 64, threads: int = 1, max_batch_requests: int = 8, batch_wait_s: float = 0.005):
        logs.configure()
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        model_dir = resolve_model(model)
        args = ModelArgs.from_dir(model_dir)
        if args.vision is None:
            raise ValueError(f"vision_workers: the model {model!r} has no image encoder (no vision_config)")
        self.runner = VisionRunner(model_dir, args, _DTYPES[dtype], device, cache_size=cache_images)
        self.runner.on_encoded = metrics.VISION_IMAGES_ENCODED_TOTAL.labels(model=model_name).inc
        self._encode_batch.set_max_batch_size(max_batch_requests)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.batches = 0
        self.largest_batch = 0  # images in the largest batch so far
        log.info("vision encoder (pid %d) ready on %s", os.getpid(), device)

    async def encode(self, images: list) -> list[torch.Tensor]:
        """One ``[tokens, hidden]`` embedding per :class:`~k2ray.tokenizer.image.ProcessedImage`."""
        return await self._encode_batch(images)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, calls: list[list]) -> list[list[torch.Tensor]]:
        flat = [im for images in calls for im in images]
        # The encoder runs on a thread: the replica's event loop keeps taking calls (the next batch) meanwhile.
        embeds = await asyncio.to_thread(self.runner.encode, flat)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(flat))
        out, k = [], 0
        for images in calls:
            out.append(embeds[k:k + len(images)])
            k += len(images)
        return out

    def stats(self) -> dict:
        return {"images_encoded": self.runner.images_encoded, "cache_hits": self.runner.cache_hits,
                "batches": self.batches, "largest_batch": self.largest_batch}
