"""Runs Kimi K2.5's image encoder: preprocessed images in, one ``[tokens, hidden]`` embedding per image out.

Used where the sequence's model runs (the engine's process). Images already encoded are answered from a small LRU
cache keyed by their content hash (a conversation resends its images with every turn).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from threading import Lock
from typing import Callable, Optional

import torch

from k2ray.checkpoint.loader import load_vision_encoder
from k2ray.config import ModelArgs
from k2ray.tokenizer.image import ProcessedImage


class VisionRunner:
    def __init__(self, model_dir: str | Path, args: ModelArgs, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", cache_size: int = 64):
        self.device = torch.device(device)
        self.encoder = load_vision_encoder(model_dir, dtype, args).to(self.device)
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = Lock()  # the encoder runs one batch at a time (callers may be several threads)
        self.images_encoded = 0  # images run through the encoder (cache hits not counted)
        self.cache_hits = 0
        self.on_encoded: Optional[Callable[[int], None]] = None  # told how many images each batch encoded

    @torch.inference_mode()
    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """One ``[image.num_tokens, hidden]`` tensor (on the CPU) per image."""
        with self._lock:
            out: dict[int, torch.Tensor] = {}
            todo = []
            for i, im in enumerate(images):
                hit = self._cache.get(im.content_hash)
                if hit is not None:
                    self._cache.move_to_end(im.content_hash)
                    out[i] = hit
                    self.cache_hits += 1
                else:
                    todo.append(i)
            if todo:
                pixels = torch.cat([images[i].pixel_values for i in todo]).to(self.device)
                embeds = self.encoder(pixels, [images[i].grid for i in todo])
                for i, e in zip(todo, embeds):
                    if e.shape[0] != images[i].num_tokens:
                        raise RuntimeError(f"encoder gave {e.shape[0]} embeddings for {images[i].num_tokens} tokens")
                    e = e.cpu()
                    out[i] = e
                    self.images_encoded += 1
                    if self.cache_size:
                        self._cache[images[i].content_hash] = e
                        while len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
                if self.on_encoded is not None:
                    self.on_encoded(len(todo))
            return [out[i] for i in range(len(images))]
