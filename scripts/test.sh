#!/usr/bin/env bash
# Installs k2ray with its test extras (CPU torch pinned by constraints.txt) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[test]"
python3 -m pytest -q -x -p no:cacheprovider tests
