"""Fixtures for the engine tests: the tiny model with tokenizer, a model-free fake executor, and engine builders."""

from __future__ import annotations

import pytest

from k2ray.config import EngineConfig


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's ops are too small to share between threads, and on a loaded 2-core machine a second OpenMP
    thread turns every op into a wait for a descheduled peer (seen: 100x slower steps). Restored afterwards."""
    from .engine_helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir):
    """The full tiny checkpoint (weights + tokenizer files), as `k2ray make-tiny` writes it."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def local_executor(model_dir):
    """One fp32 LocalExecutor with a roomy cache, shared by the engine tests (engines may use fewer blocks)."""
    from k2ray.executor.local import LocalExecutor

    return LocalExecutor(model_dir, EngineConfig(num_kv_blocks=1024, block_size=4))


@pytest.fixture
def make_engine(local_executor, model_dir):
    """``make_engine(num_kv_blocks=None, **EngineConfig fields)`` -> LLMEngine over the shared tiny model."""
    from k2ray.engine.engine import LLMEngine
    from k2ray.engine.input_processor import load_eos_token_ids, load_tokenizer

    from .engine_helpers import ExecutorView

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
