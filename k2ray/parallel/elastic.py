"""When to resize a model group's attention and expert pools: the router's own policy (pure; no Ray).

The router feeds :meth:`ElasticPolicy.observe` a :class:`PoolSignals` now and then (every second) and asks
:meth:`ElasticPolicy.decide` for a new layout. Per pool, one worker at a time:

- attention workers: up when the KV cache is nearly full or sequences wait for a place; down when the cache is
  mostly free and nothing waits;
- expert shards: up when the attention workers spend a large share of each step waiting for the experts (their
  compute plus the all-to-all); down when that share is small.

Hysteresis twice over: a condition must hold in every observation of the last ``window_s`` seconds (and the window
must be covered), and the up and down thresholds differ. After any resize both pools wait ``cooldown_s`` (and the
observations before the resize are forgotten: they describe the old layout). Up wins over down, attention is looked
at before experts, and only one pool changes per decision.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from k2ray.config import ElasticConfig


@dataclass(frozen=True)
class PoolSignals:
    time: float  # monotonic seconds
    kv_usage: float  # mean fraction of cache blocks held by live sequences over the attention workers
    waiting: int  # sequences waiting for admission
    expert_wait: float  # share of step time the attention workers waited for the experts (0 when idle)


@dataclass(frozen=True)
class Decision:
    attention_workers: int
    expert_shards: int
    pool: str  # "attention_workers" or "expert_shards"
    direction: str  # "up" or "down"
    reason: str


class ElasticPolicy:
    def __init__(self, config: ElasticConfig, attention: tuple[int, int], experts: tuple[int, int]):
        """``attention`` / ``experts``: the (min, max) of each pool."""
        self.config = config
        self.bounds = {"attention_workers": attention, "expert_shards": experts}
        self.window: deque[PoolSignals] = deque()
        self.last_resize: float | None = None

    def observe(self, s: PoolSignals) -> None:
        self.window.append(s)
        # Keep the observations of the window and the last one before it (it shows the window is covered).
        while len(self.window) > 1 and self.window[1].time <= s.time - self.config.window_s:
            self.window.popleft()

    def resized(self, now: float) -> None:
        """A resize happened (by this policy or the admin call): cool down and forget the old layout's signals."""
        self.last_resize = now
        self.window.clear()

    def decide(self, now: float, attention_workers: int, expert_shards: int) -> Decision | None:
        c = self.config
        if self.last_resize is not None and now - self.last_resize < c.cooldown_s:
            return None
        if not self.window or self.window[0].time > now - c.window_s:
            return None  # the window is not covered yet
        seen = [s for s in self.window if s.time >= now - c.window_s] or [self.window[-1]]
        waiting = sum(s.waiting for s in seen) / len(seen)
        current = {"attention_workers": attention_workers, "expert_shards": expert_shards}
        rules = [
            ("attention_workers", "up", all(s.kv_usage >= c.kv_usage_high for s in seen) or waiting >= c.waiting_high,
             f"KV-cache use >= {c.kv_usage_high} or {waiting:.1f} sequences waiting"),
            ("expert_shards", "up", all(s.expert_wait >= c.expert_wait_high for s in seen),
             f"attention waited >= {c.expert_wait_high:.0%} of each step for the experts"),
            ("attention_workers", "down", all(s.kv_usage < c.kv_usage_low and s.waiting == 0 for s in seen),
             f"KV-cache use < {c.kv_usage_low} and nothing waiting"),
            ("expert_shards", "down", all(s.expert_wait < c.expert_wait_low for s in seen),
             f"attention waited < {c.expert_wait_low:.0%} of each step for the experts"),
        ]
        for pool, direction, holds, reason in rules:
            lo, hi = self.bounds[pool]
            n = current[pool] + (1 if direction == "up" else -1)
            if holds and lo <= n <= hi:
                new = {**current, pool: n}
                return Decision(new["attention_workers"], new["expert_shards"], pool, direction,
                                f"{reason} for {c.window_s:.0f}s")
        return None
