#!/usr/bin/env bash
# The GPU campaign (#26), one entry point. See bench/gpu/README.md.
#
#   bash bench/gpu/campaign.sh            # on the GPU machine: installs the carried wheels, runs every section
#   bash bench/gpu/campaign.sh --dry-run  # the same code at tiny shapes on CPU (CI: tests/test_gpu_campaign.py)
#   bash bench/gpu/campaign.sh --only moe,mla
#
# Figures go to $OUT when it is set (the device call returns that folder), else bench/gpu/results/:
# results.jsonl (one JSON line per figure), summary.md, campaign.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
out="${OUT:-bench/gpu/results}"
mkdir -p "$out"
log="$out/campaign.log"
: > "$log"

if [ "$dry" = 1 ]; then
    # The project's virtual environment when there is one (k2ray installed, Python 3.11), else the python3 on PATH.
    py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    export TRITON_INTERPRET=1
else
    py=python3  # the device image's Python (3.12, with torch, triton, transformers)
    wheels=bench/gpu/wheels
    if [ ! -d "$wheels" ]; then
        echo "campaign.sh: $wheels is missing: run 'bash bench/gpu/prepare-wheels.sh' here first and name" \
             "bench/gpu/wheels in the device call's carry" | tee -a "$log"
        exit 2
    fi
    site=/tmp/k2ray-campaign-site
    rm -rf "$site"
    # k2ray's own wheel is rebuilt from this tree when the carried one was built from other sources.
    stamp=$(bash bench/gpu/prepare-wheels.sh --stamp)
    if [ "$(cat "$wheels/k2ray.stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "campaign.sh: the carried k2ray wheel does not match this tree: building it here" | tee -a "$log"
        rm -f "$wheels"/k2ray-*.whl
        $py -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$wheels" . 2>&1 | tee -a "$log"
    fi
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl 2>&1 | tee -a "$log" || { echo "campaign.sh: installing the wheels failed" | tee -a "$log"; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$log"
fi
export PYTHONUNBUFFERED=1
$py bench/gpu/campaign.py --out "$out" "$@" 2>&1 | tee -a "$log"
rc=$?
# The summary last, so that the end of the output (all a device call's reply may carry) is the report itself.
[ -f "$out/summary.md" ] && { echo; cat "$out/summary.md"; }
exit $rc
