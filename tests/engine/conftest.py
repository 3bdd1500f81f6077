"""Fixtures for the engine tests: the tiny model with tokenizer, a model-free fake executor, and engine builders."""

from __future__ import annotations

import pytest

from k2ray.config import EngineConfig, ModelArgs
from k2ray.executor.base import StepInput, StepOutput


@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory):
    """The full tiny checkpoint (weights + tokenizer files), as `k2ray make-tiny` writes it."""
    try:
        return request.getfixturevalue("tiny_model_dir")
    except ImportError:  # make_tiny not usable yet in this tree: assemble the same files directly
        from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint
        from k2ray.tokenizer import write_tokenizer_files

        d = tmp_path_factory.mktemp("k2ray-tiny-engine")
        cfg = tiny_config()
        write_checkpoint(d, cfg, random_state_dict(ModelArgs.from_dict(cfg), seed=0))
        write_tokenizer_files(d)
        return d


@pytest.fixture(scope="session")
def local_executor(model_dir):
    """One fp32 LocalExecutor with a roomy cache, shared by the engine tests (engines may use fewer blocks)."""
    from k2ray.executor.local import LocalExecutor

    return LocalExecutor(model_dir, EngineConfig(num_kv_blocks=1024, block_size=4))


class ExecutorView:
    """The shared executor seen through a smaller cache: an engine over it uses blocks ``[0, num_kv_blocks)`` only."""

    def __init__(self, inner, num_kv_blocks: int | None = None):
        self.inner = inner
        self.args = inner.args
        self.num_partitions = inner.num_partitions
        self.block_size = inner.block_size
        self.num_kv_blocks = num_kv_blocks or inner.num_kv_blocks
        assert self.num_kv_blocks <= inner.num_kv_blocks
        self.steps = 0
        self.fail_at: int | None = None

    def execute(self, step: StepInput) -> StepOutput:
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("injected executor failure")
        for s in step.seqs:
            assert all(0 <= b < self.num_kv_blocks for b in s.block_table), s.block_table
        return self.inner.execute(step)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def make_engine(local_executor, model_dir):
    """``make_engine(num_kv_blocks=None, **EngineConfig fields)`` -> LLMEngine over the shared tiny model."""
    from k2ray.engine.engine import LLMEngine, load_eos_token_ids, load_tokenizer

    tok = load_tokenizer(model_dir)
    eos = load_eos_token_ids(model_dir)
    engines = []

    def make(num_kv_blocks=None, eos_token_ids=None, **kw):
        view = ExecutorView(local_executor, num_kv_blocks)
        cfg = EngineConfig(block_size=local_executor.block_size, num_kv_blocks=view.num_kv_blocks, **kw)
        eng = LLMEngine(view, cfg, tok, eos if eos_token_ids is None else eos_token_ids)
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.shutdown()
