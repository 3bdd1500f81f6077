"""The package's layer stack (pyproject's [tool.importlinter], docs/architecture.md) holds, catches a reverse import,
has no import cycle, and Ray is imported only where the design puts it."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "k2ray"
LINT = Path(sys.executable).with_name("lint-imports")
RAY_PACKAGES = {"executor", "workers", "serve"}  # where the design runs Ray
RAY_MODULES = {"metrics.py"}  # the Ray metrics backend, imported when that backend is chosen


def _lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_layer_contract_is_kept():
    out = _lint(ROOT)
    assert out.returncode == 0 and "Contracts: 1 kept, 0 broken." in out.stdout, out.stdout[-3000:]


def test_a_planted_reverse_import_breaks_the_contract(tmp_path):
    """The same contract on a copy of the package in which the model imports the Serve app: lint-imports fails and
    names the import."""
    shutil.copytree(PACKAGE, tmp_path / "k2ray", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    rope = tmp_path / "k2ray" / "model" / "rope.py"
    rope.write_text(rope.read_text() + "\nimport k2ray.serve.app  # planted\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, not the installed package
    out = _lint(tmp_path, env)
    assert out.returncode != 0 and "Contracts: 0 kept, 1 broken." in out.stdout, out.stdout[-3000:]
    assert "k2ray.model.rope -> k2ray.serve.app" in out.stdout


def test_no_import_cycle_between_modules():
    import grimp

    graph = grimp.build_graph("k2ray")
    edges = {m: {n for n in graph.find_modules_directly_imported_by(m) if n in graph.modules} for m in graph.modules}
    cycles = []
    for start in sorted(edges):  # a path from a module's imports back to it is a cycle
        seen, stack = set(), [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert not cycles, cycles[:3]


def test_ray_is_imported_only_in_executor_workers_and_serve():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in RAY_PACKAGES or str(rel) in RAY_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(f"k2ray/{rel}:{node.lineno}")
    assert not offenders, offenders
