import pytest


@pytest.fixture(scope="session")
def k25_dir(tmp_path_factory):
    """The tiny K2.5 checkpoint as `k2ray make-tiny --format kimi_k25` writes it (released layout)."""
    from k2ray.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("k2ray-tiny-k25"), seed=0, format="kimi_k25")


@pytest.fixture(scope="session")
def k25_hf_dir(k25_dir, tmp_path_factory):
    """The same checkpoint converted to transformers' kimi_k25 names and config keys (tests/vision/hf_k25.py)."""
    from .hf_k25 import convert_checkpoint

    return convert_checkpoint(k25_dir, tmp_path_factory.mktemp("k2ray-tiny-k25-hf"))


@pytest.fixture(scope="session")
def hf_k25(k25_hf_dir):
    from .hf_k25 import load_hf_k25

    return load_hf_k25(k25_hf_dir)
