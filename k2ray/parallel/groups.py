"""One ``torch.distributed`` process group per model group: attention workers first, then expert shards."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class GroupLayout:
    attention_workers: int
    expert_shards: int

    @property
    def world_size(self) -> int:
        return self.attention_workers + self.expert_shards

    def attention_rank(self, i: int) -> int:
        return i

    def shard_rank(self, s: int) -> int:
        return self.attention_workers + s


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_group(backend: str, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the model group's process group (a fresh rendezvous per group, so groups can share a node)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
