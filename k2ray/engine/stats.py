"""What one engine step did and how long each phase took (for ``LLMEngine.on_step`` and ``metrics()``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepStats:
    schedule_s: float  # scheduling and building the step's work (grammar masks included)
    execute_s: float  # the executor's model step
    process_s: float  # appending tokens, detokenizing, stop checks, building outputs
    num_seqs: int
    num_batched_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    grammar_mask_s: float = 0.0  # part of schedule_s: token masks of the constrained sequences
    num_constrained: int = 0  # sequences sampled under a grammar this step
    cost: int = 0  # token-equivalents scheduled (attention at context included; k2ray.engine.step_cost)
    cost_budget: int = 0  # the step's cost budget (max_step_cost, or calibrated to max_step_ms)
    executor: dict = field(default_factory=dict)  # executor-specific timings/counters (StepOutput.stats)

    def as_dict(self) -> dict:
        """Plain dict (for JSON); ``executor`` only when the executor reported something."""
        d = asdict(self)
        if not self.executor:
            del d["executor"]
        return d
