"""What a step costs in token-equivalents, and how many a step may spend (issue #21: long context without stalls).

A chunk of ``q`` prompt tokens that starts at context offset ``c`` costs about ``a·q`` (projections, dense and MoE
MLPs: the same for every token) plus ``b·q·(c + q/2)`` (causal attention over the ``c`` earlier tokens and the chunk
itself). Counted in short-context tokens (``a = 1``)::

    cost(q, c) = q + q·(2c + q) / (2·A)        A = attention_cost_tokens = a / b

``A`` is the context length at which one token's attention costs as much as all the rest of its work. The attention
part is floored to whole token-equivalents, so a step at short context costs exactly its token count and a budget
equal to ``max_num_batched_tokens`` changes nothing there. A decode is the chunk ``q = 1``.

The budget is fixed (``EngineConfig.max_step_cost``) or, with a target step time (``max_step_ms``), rescaled from
measured steps: ``target / (ms per token-equivalent)``, the rate an exponential average of full-enough steps. Fixed
per-step overhead inflates the measured rate; the budget then shrinks until ``overhead + cost`` meets the target,
which is the point (the fixed point of ``B' = target·B / (overhead + k·B)`` is ``(target - overhead) / k``).
"""

from __future__ import annotations

import math
from typing import Optional


def chunk_cost(q: int, c: int, attention_cost_tokens: int) -> int:
    """Token-equivalents of ``q`` tokens computed at context offset ``c``."""
    return q + (q * (2 * c + q)) // (2 * attention_cost_tokens)


def max_chunk(c: int, limit: int, cost_left: int, attention_cost_tokens: int) -> int:
    """The largest ``q <= limit`` with ``chunk_cost(q, c) <= cost_left`` (0 if none)."""
    if limit <= 0 or cost_left <= 0:
        return 0
    a = attention_cost_tokens
    # Root of q^2 + 2(c + A)q - 2A·L = 0 (the unfloored cost), then fixed up for the floor and integer rounding.
    q = max(0, min(limit, math.isqrt((c + a) ** 2 + 2 * a * cost_left) - (c + a)))
    while q < limit and chunk_cost(q + 1, c, a) <= cost_left:
        q += 1
    while q > 0 and chunk_cost(q, c, a) > cost_left:
        q -= 1
    return q


class StepBudget:
    """The token-equivalents one step may spend: ``max_step_cost``, or calibrated to ``max_step_ms``."""

    def __init__(self, max_step_cost: int, max_step_ms: Optional[float] = None, alpha: float = 0.25):
        self.initial = max_step_cost
        self.max_step_ms = max_step_ms
        self.alpha = alpha
        self._ms = 0.0  # exponential averages of step time and step cost (over informative steps)
        self._cost = 0.0

    @property
    def ms_per_cost(self) -> Optional[float]:
        """Measured milliseconds per token-equivalent (None until a step was measured)."""
        return self._ms / self._cost if self._cost > 0 else None

    @property
    def value(self) -> int:
        rate = self.ms_per_cost
        if self.max_step_ms is None or rate is None or rate <= 0:
            return self.initial
        return max(1, int(self.max_step_ms / rate))

    def observe(self, cost: int, seconds: float) -> None:
        """Feed one step's cost and wall time. Steps far below the budget say mostly how large the fixed overhead
        is, which would shrink the budget for nothing: only steps that spent half of it or more count."""
        if self.max_step_ms is None or cost <= 0 or 2 * cost < self.value:
            return
        ms = seconds * 1e3
        if self._cost == 0:
            self._ms, self._cost = ms, float(cost)
        else:
            self._ms += self.alpha * (ms - self._ms)
            self._cost += self.alpha * (cost - self._cost)
