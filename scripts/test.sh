#!/usr/bin/env bash
# The test command: installs requirements.lock and k2ray into .venv (scripts/install.sh; under CI=true a fresh one,
# so a dependency missing from the lock fails here instead of hiding in site-packages), installs Debian's
# Prometheus server and nginx (the end-to-end tests run them), checks the import layers, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" = true ]; then
  export K2RAY_FRESH_VENV=1
fi
bash scripts/install.sh
venv="${K2RAY_VENV:-.venv}"
# Debian packages the end-to-end tests run for real: Prometheus (the metrics tests scrape with it) and nginx (k2ray's
# edge, `k2ray edge`). nginx lives in /usr/sbin, which a non-root PATH may lack.
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "k2ray test: installing Debian's ${missing[*]} with apt-get (running as root) for the end-to-end tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "k2ray test: warning: could not install ${missing[*]}; the tests that run them will fail" >&2
  else
    echo "k2ray test: warning: ${missing[*]} not installed and this is not root; install them" \
         "(sudo apt-get install ${missing[*]}) or the tests that run them will fail" >&2
  fi
fi
echo "k2ray test: running the test suite ($("$venv/bin/python" -c 'import torch, transformers, ray
print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")'))"
echo "k2ray test: checking the import layers (lint-imports, pyproject.toml [tool.importlinter])"
"$venv/bin/lint-imports" --no-cache
# The venv's pytest entry point, not `python -m pytest`: that would put the checkout first on sys.path.
"$venv/bin/pytest" -q -p no:cacheprovider tests "$@"
