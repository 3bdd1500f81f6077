#!/usr/bin/env bash
# Not part of CI's verdict: installs the NEWEST releases that pyproject.toml allows (torch held at the lock's CPU
# build) into a fresh .venv-latest and runs the fast tests (no Ray cluster, nothing slow), so the next upstream
# break shows here before requirements.lock is bumped (scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-latest
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
torch_pin=$(grep -E '^torch==' requirements.lock)
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
echo "$torch_pin" >"$pins"
echo "k2ray test-latest: $torch_pin (from the lock), everything else at the newest allowed release"
if ! "$py" -m pip install -q --disable-pip-version-check "$torch_pin" 2>/dev/null; then
  "$py" -m pip install -q --disable-pip-version-check "uv==0.13.9"
  "$venv/bin/uv" pip install --python "$py" --torch-backend cpu "$torch_pin"
fi
"$py" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -c "$pins" \
  -e ".[test,examples,kernels]"
"$py" - <<'PY'
import re
from importlib.metadata import distributions

lock = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups() for line in open("requirements.lock")
            if re.match(r"[A-Za-z0-9_.-]+==", line))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {norm(k): v for k, v in lock.items()}
for d in sorted(distributions(), key=lambda d: norm(d.metadata["Name"])):
    name = norm(d.metadata["Name"])
    if lock.get(name, d.version) != d.version:
        print(f"k2ray test-latest: {name} {d.version} (lock: {lock[name]})")
PY
"$venv/bin/pytest" -q -p no:cacheprovider -m "not ray and not slow" tests "$@"
