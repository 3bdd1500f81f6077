"""The whole model in this process: one attention worker, all routed experts local."""

from __future__ import annotations

from pathlib import Path

from k2ray.checkpoint.loader import load_model
from k2ray.config import EngineConfig, ModelArgs
from k2ray.runtime.step import StepInput, StepOutput
from k2ray.runtime.runner import ModelRunner


class LocalExecutor:
    num_attention_workers = 1
    failed = None  # nothing remote to lose

    def __init__(self, model_dir: str | Path, engine: EngineConfig | None = None, device: str = "cpu"):
        engine = engine or EngineConfig()
        self.model_dir, self.engine, self.device = model_dir, engine, device
        self.args = ModelArgs.from_dir(model_dir)
        self.block_size = engine.block_size
        self.num_kv_blocks = engine.kv_blocks_for(self.args)
        int4 = engine.experts_int4(self.args, device)
        model = load_model(model_dir, dtype=engine.torch_dtype, experts_int4=int4).to(device)
        self.runner = ModelRunner(model, self.num_kv_blocks, engine.block_size, engine.torch_dtype, device)

    def execute(self, step: StepInput) -> StepOutput:
        results = self.runner.execute(step.seqs)
        return StepOutput(results={r.seq_id: r for r in results})

    def describe(self) -> dict:
        return {"executor": "local", "device": self.device}

    def heartbeat(self, timeout_s: float = 1.0) -> str | None:
        """Nothing remote that could have died (see :meth:`RayExecutor.heartbeat`)."""
        return None

    def rebuild(self) -> None:
        self.__init__(self.model_dir, self.engine, self.device)

    def shutdown(self) -> None:
        self.runner = None
