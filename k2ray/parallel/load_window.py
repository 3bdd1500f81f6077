"""Expert load over a sliding window of steps, per MoE layer: what the EPLB planner plans from and what the
balancedness gauge shows."""

from __future__ import annotations

from collections import deque

import numpy as np

from k2ray.parallel.eplb import balancedness


class LoadWindow:
    """The last ``window_steps`` steps' tokens per (MoE layer, logical expert) and per (MoE layer, shard).

    Running sums make :meth:`add` O(layers x experts) whatever the window length."""

    def __init__(self, n_layers: int, n_experts: int, n_shards: int, window_steps: int):
        if window_steps < 1:
            raise ValueError("window_steps must be at least 1")
        self.window_steps = window_steps
        self._steps: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._experts = np.zeros((n_layers, n_experts), dtype=np.int64)
        self._shards = np.zeros((n_layers, n_shards), dtype=np.int64)

    @property
    def steps(self) -> int:
        return len(self._steps)

    def add(self, expert_tokens: np.ndarray, shard_tokens: np.ndarray) -> None:
        """One step's ``[layer, expert]`` and ``[layer, shard]`` token counts."""
        e = np.asarray(expert_tokens, dtype=np.int64)
        s = np.asarray(shard_tokens, dtype=np.int64)
        self._steps.append((e, s))
        self._experts += e
        self._shards += s
        if len(self._steps) > self.window_steps:
            old_e, old_s = self._steps.popleft()
            self._experts -= old_e
            self._shards -= old_s

    def clear(self) -> None:
        """Forget everything (after a switch: shard loads measured under the old table say nothing of the new)."""
        self._steps.clear()
        self._experts[:] = 0
        self._shards[:] = 0

    def expert_load(self) -> list[list[int]]:
        return self._experts.tolist()

    def shard_load(self) -> list[list[int]]:
        return self._shards.tolist()

    def balancedness(self) -> list[float] | None:
        """Mean over max of the shards' tokens, per layer (None before any token was counted)."""
        if not self._shards.any():
            return None
        return [balancedness(row) for row in self._shards.tolist()]
