#!/usr/bin/env bash
# Installs k2ray with its test extras (CPU torch pinned by constraints.txt) and the Prometheus server the
# observability tests scrape with, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
      || echo "warning: could not install prometheus; the metrics end-to-end tests will fail" >&2
  else
    echo "warning: prometheus is not installed (sudo apt-get install prometheus)" >&2
  fi
fi
python3 -m pip install -q -c constraints.txt -e ".[test]"
python3 -m pytest -q -p no:cacheprovider tests
