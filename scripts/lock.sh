#!/usr/bin/env bash
# Regenerates requirements.lock: every direct and transitive dependency of k2ray (all extras) for CPython 3.11 on
# x86-64 Linux, with the CPU build of PyTorch. Needs uv (`pip install uv`).
#
# With internet access uv takes torch from PyTorch's own CPU wheel index (--torch-backend cpu). On a machine that
# reaches only PyPI but holds the CPU wheel in a local folder, name that folder: K2RAY_TORCH_WHEELS=DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CPU="torch==2.13.0+cpu"
args=(pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_28
      --no-emit-find-links --custom-compile-command "bash scripts/lock.sh" -o requirements.lock)
override=$(mktemp)
trap 'rm -f "$override"' EXIT
echo "$TORCH_CPU" >"$override"
if [ -n "${K2RAY_TORCH_WHEELS:-}" ]; then
  uv "${args[@]}" --override "$override" --find-links "$K2RAY_TORCH_WHEELS"
else
  uv "${args[@]}" --override "$override" --torch-backend cpu
fi
