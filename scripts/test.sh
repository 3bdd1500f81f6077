#!/usr/bin/env bash
# The test command: installs requirements.lock and k2ray into .venv (scripts/install.sh; under CI=true a fresh one,
# so a dependency missing from the lock fails here instead of hiding in site-packages), installs Debian's
# Prometheus server (the observability tests scrape with it), checks the import layers, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" = true ]; then
  export K2RAY_FRESH_VENV=1
fi
bash scripts/install.sh
venv="${K2RAY_VENV:-.venv}"
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "k2ray test: installing Debian's prometheus package with apt-get (running as root) for the metrics tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
      || echo "k2ray test: warning: could not install prometheus; the metrics end-to-end tests will fail" >&2
  else
    echo "k2ray test: warning: prometheus is not installed and this is not root; install it" \
         "(sudo apt-get install prometheus) or the metrics end-to-end tests will fail" >&2
  fi
fi
echo "k2ray test: running the test suite ($("$venv/bin/python" -c 'import torch, transformers, ray
print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")'))"
echo "k2ray test: checking the import layers (lint-imports, pyproject.toml [tool.importlinter])"
"$venv/bin/lint-imports" --no-cache
# The venv's pytest entry point, not `python -m pytest`: that would put the checkout first on sys.path.
"$venv/bin/pytest" -q -p no:cacheprovider tests "$@"
