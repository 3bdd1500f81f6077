"""Where a ``model`` argument points: a checkpoint directory, or a built-in name.

Built-in names:

* ``k2ray-tiny``: the random-weight tiny K2 checkpoint, written by :func:`k2ray.checkpoint.tiny.make_tiny` on first use
  into the cache directory (``$K2RAY_CACHE_DIR``, default ``~/.cache/k2ray``). The directory name carries a hash of the
  writer's source and the tokenizer files, so a changed writer never serves a stale cache. Several processes (the
  ingress and router replicas of one node) may resolve it at once: a file lock makes one of them write, into a
  temporary directory renamed into place when complete.
* ``k2ray-demo``: the trained demo checkpoint shipped inside the package (``k2ray/assets/k2ray-demo``).

Anything else is a directory that must hold a ``config.json``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from k2ray.config import ConfigError

__all__ = ["BUILTIN_MODELS", "cache_dir", "resolve_model", "default_served_name", "builtin_available"]

BUILTIN_MODELS = ("k2ray-tiny", "k2ray-demo")
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # k2ray/
DEMO_DIR = _PACKAGE_DIR / "assets" / "k2ray-demo"


def cache_dir() -> Path:
    """``$K2RAY_CACHE_DIR`` or ``~/.cache/k2ray``."""
    env = os.environ.get("K2RAY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "k2ray"


def _tiny_fingerprint() -> str:
    from k2ray.checkpoint import tiny
    from k2ray.tokenizer.tiny import DATA_DIR, TOKENIZER_FILES

    h = hashlib.sha256()
    h.update(Path(tiny.__file__).read_bytes())
    for name in TOKENIZER_FILES:
        h.update(Path(DATA_DIR, name).read_bytes())
    return h.hexdigest()[:12]


def _tiny_dir() -> Path:
    root = cache_dir() / "models"
    target = root / f"k2ray-tiny-{_tiny_fingerprint()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(root / ".k2ray-tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process wrote it meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".k2ray-tiny-", dir=root))
        try:
            from k2ray.checkpoint.tiny import make_tiny

            make_tiny(tmp, seed=0)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_available(name: str) -> bool:
    """Whether a built-in model can be resolved in this installation (``k2ray-tiny`` always can)."""
    if name == "k2ray-tiny":
        return True
    if name == "k2ray-demo":
        return (DEMO_DIR / "config.json").is_file()
    return False


def resolve_model(model: str) -> Path:
    """The checkpoint directory for ``model`` (a built-in name or a directory). Raises :class:`ConfigError`."""
    if model == "k2ray-tiny":
        return _tiny_dir()
    if model == "k2ray-demo":
        if not builtin_available("k2ray-demo"):
            raise ConfigError(
                "model: the built-in 'k2ray-demo' checkpoint is not in this installation "
                "(expected k2ray/assets/k2ray-demo/config.json)"
            )
        return DEMO_DIR
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model: {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a directory with a "
            "config.json"
        )
    return path


def default_served_name(model: str) -> str:
    """The name clients use when ``served_model_name`` is not set: a built-in's name, else the directory's name."""
    if model in BUILTIN_MODELS:
        return model
    return Path(model).expanduser().name or model
