import os
import sys

import pytest
import torch

# Tests import the installed k2ray; nothing puts the checkout on sys.path (pytest runs with --import-mode=importlib),
# so no folder of the checkout (kernels/ above all) can shadow an installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m pytest` run from the checkout puts it first on sys.path anyway: take it off again.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory):
    """A random-weight tiny K2 checkpoint (weights + config only)."""
    from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint
    from k2ray.config import ModelArgs

    d = tmp_path_factory.mktemp("tiny-weights")
    cfg = tiny_config()
    write_checkpoint(d, cfg, random_state_dict(ModelArgs.from_dict(cfg), seed=0))
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The full tiny checkpoint as `k2ray make-tiny` writes it (weights + tokenizer + chat template)."""
    from k2ray.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("k2ray-tiny"), seed=0)


@pytest.fixture(scope="session")
def train_demo():
    """The demo model's trainer, ``k2ray.demo.train``: its tools and corpus (re-exported there) and training code."""
    from k2ray.demo import train

    return train


@pytest.fixture(autouse=True, scope="module")
def _ray_isolated_per_module():
    """Each test module starts without a Ray connection and leaves none behind (modules start their own clusters)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
