"""What a newcomer meets first: the installed package (not the checkout) is what the tests import, the lock is what
is installed, the CLI works from the base install, and the README's code runs as written."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts (k2ray, serve, pytest)


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_hub_kernels_import_with_the_checkout_as_working_directory(monkeypatch):
    """transformers imports Hugging Face's `kernels` package; the checkout's own kernels/ folder (our Triton kernels,
    imported as k2ray.kernels) must not shadow it, with the repository root as the working directory."""
    monkeypatch.chdir(ROOT)
    assert not any(Path(p or os.curdir).resolve() == ROOT for p in sys.path), sys.path
    import kernels
    import transformers.integrations.hub_kernels as hub

    assert Path(kernels.__file__).resolve() != ROOT / "kernels" / "__init__.py"
    assert "site-packages" in Path(kernels.__file__).parts, kernels.__file__
    assert callable(kernels.get_kernel) and hub.__name__ == "transformers.integrations.hub_kernels"
    import k2ray.kernels as ours

    assert Path(ours.__file__).resolve().parent == ROOT / "kernels" and callable(ours.fused_moe_int4)


def test_the_lock_is_what_is_installed():
    """Every pin of requirements.lock is installed at exactly that version; torch is the CPU build."""
    from importlib.metadata import PackageNotFoundError, version

    pins = _lock()
    assert pins["torch"].endswith("+cpu") and len(pins) > 50
    wrong = {}
    for name, want in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have != want:
            wrong[name] = (have, want)
    assert not wrong, f"installed != requirements.lock: {wrong}"
    import torch

    assert torch.__version__ == pins["torch"] and not torch.version.cuda


def test_pyproject_dependencies_are_in_the_lock():
    """Each direct dependency (base and extras) of pyproject.toml is pinned in the lock."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group(0)).lower() for r in reqs}
    assert names - set(_lock()) == set()


def test_cli_help_and_bench_help_from_the_base_install():
    for argv in (["--help"], ["bench", "serve", "--help"], ["generate", "--help"]):
        out = subprocess.run([str(BIN / "k2ray"), *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "make-tiny" in subprocess.run([str(BIN / "k2ray"), "--help"], capture_output=True, text=True,
                                         timeout=120).stdout


def test_docs_link_only_inside_the_repository():
    """Relative links of the README and docs/ resolve to files of the checkout (none point outside it)."""
    bad = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "helm" / "k2ray" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)", md.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (md.parent / target).resolve()
            if ROOT not in path.parents or not path.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target}")
    assert not bad, bad


def _readme_block(lang: str, must_contain: str) -> str:
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith(lang + "\n")]
    (block,) = [b for b in blocks if must_contain in b]
    return block


def test_readme_first_commands_name_the_scripts():
    install = _readme_block("bash", "serve run")
    assert install.strip() == "bash scripts/install.sh && . .venv/bin/activate && serve run deploy/config.yaml"
    assert _readme_block("bash", "scripts/test.sh").strip() == "bash scripts/test.sh"
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash scripts/test.sh")


@pytest.mark.slow
def test_readme_cli_examples_run_as_written(tmp_path):
    """The README's shell examples, line by line (the make-tiny directory moved into a temporary folder)."""
    block = _readme_block("bash", "k2ray make-tiny")
    lines = [ln.replace("/tmp/k2ray-tiny", str(tmp_path / "k2ray-tiny")) for ln in block.strip().splitlines()]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    outputs = []
    for line in lines:
        out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (line, out.stderr[-2000:])
        outputs.append(out)
    assert (tmp_path / "k2ray-tiny" / "config.json").is_file()
    assert outputs[2].stdout.startswith("hello") and "[finish_reason: " in outputs[2].stderr
    assert "Tokyo" in outputs[3].stdout and outputs[3].stderr.startswith("[finish_reason: stop, ")


@pytest.mark.ray
@pytest.mark.slow
def test_readme_offline_python_example_runs_as_written(tmp_path):
    """The README's offline example, verbatim, in a fresh interpreter: a Ray model group of 1 attention worker and
    2 expert shards on this 2-core machine, the demo model's answers."""
    code = _readme_block("python", "from k2ray import LLM")
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = re.search(r" \[(\d+(?:, \d+)*)\]\n", out.stdout)  # print(text, token_ids)
    assert ids and 1 <= len(json.loads(f"[{ids.group(1)}]")) <= 16, out.stdout
    message = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # print(res.messages[0])
    assert message["role"] == "assistant" and message["content"], message
