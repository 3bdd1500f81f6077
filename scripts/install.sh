#!/usr/bin/env bash
# Installs exactly requirements.lock, then k2ray itself (editable, no other dependencies), into a virtual environment:
# .venv in the checkout, or $K2RAY_VENV. K2RAY_FRESH_VENV=1 deletes it first, so nothing installed earlier by hand
# can hide a missing dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${K2RAY_VENV:-.venv}"
if [ "${K2RAY_FRESH_VENV:-0}" = 1 ] && [ -d "$venv" ]; then
  echo "k2ray install: removing $venv (K2RAY_FRESH_VENV=1)"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "k2ray install: creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
echo "k2ray install: installing requirements.lock into $venv (first time: a few minutes)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$py" -m pip install -q --disable-pip-version-check -r requirements.lock 2>"$log"; then
  if grep -q "torch==.*+cpu" "$log"; then
    # Plain pip sees only PyPI, which has no CPU build of torch; uv knows PyTorch's own CPU wheel index.
    echo "k2ray install: pip cannot see PyTorch's CPU build; installing the lock with uv --torch-backend cpu"
    "$py" -m pip install -q --disable-pip-version-check "uv==0.13.9"
    "$venv/bin/uv" pip install --python "$py" --torch-backend cpu -r requirements.lock
  else
    cat "$log" >&2
    exit 1
  fi
fi
"$py" -m pip install -q --disable-pip-version-check --no-deps -e .
echo "k2ray install: done ($("$py" -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")')); \
activate it with: . $venv/bin/activate"
