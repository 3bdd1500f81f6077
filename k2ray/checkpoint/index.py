"""The safetensors index of a model directory and selective, memory-mapped tensor reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from k2ray.checkpoint import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointIndex:
    """Maps tensor names to shard files and reads single tensors on demand.

    Nothing is read until :meth:`get` is called; ``tensors_read`` records every name read, so a caller (or a test) can
    check that a role touched only its own tensors.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.tensors_read: list[str] = []
        self._handles: dict[str, object] = {}
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            try:
                raw = json.loads(index_path.read_text())
                weight_map = raw["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: corrupt safetensors index ({type(e).__name__}: {e})") from None
            self.weight_map: dict[str, str] = dict(weight_map)
            for shard in sorted(set(self.weight_map.values())):
                if not (self.model_dir / shard).is_file():
                    raise CheckpointError(f"{index_path}: shard file {shard!r} listed in weight_map does not exist")
        elif (self.model_dir / SINGLE_FILE).is_file():
            with safe_open(str(self.model_dir / SINGLE_FILE), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.model_dir}: no {INDEX_FILE} or {SINGLE_FILE}")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir / INDEX_FILE}: tensor {name!r} is missing from the checkpoint") from None

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(self.model_dir / shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{self.model_dir / shard}: cannot open safetensors shard: {e}") from None
            self._handles[shard] = h
        return h

    def get(self, name: str) -> torch.Tensor:
        shard = self.shard_of(name)
        try:
            t = self._handle(shard).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.model_dir / shard}: cannot read tensor {name!r}: {e}") from None
        self.tensors_read.append(name)
        return t

    def nbytes(self, name: str) -> int:
        """Size of a tensor without reading it (from the safetensors header)."""
        sl = self._handle(self.shard_of(name)).get_slice(name)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _DTYPE_BYTES.get(sl.get_dtype(), 4)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1}
