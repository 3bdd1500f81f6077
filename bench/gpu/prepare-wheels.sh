#!/usr/bin/env bash
# Fill bench/gpu/wheels/ (git-ignored) with what the GPU machine's image lacks for the campaign, so that the device
# call installs offline (nothing outside that machine can be reached from it):
#
# - the wheels of k2ray's pure-Python dependencies the image does not ship, at the versions of requirements.lock,
#   for CPython 3.12 on x86-64 Linux (the image's Python): pydantic, pydantic-core, annotated-types,
#   typing-inspection, typing-extensions (the image has torch, triton, transformers, safetensors, tiktoken, jinja2,
#   numpy, tqdm, pytest; the campaign imports nothing else: no Ray, no xgrammar);
# - k2ray's own wheel, built from this tree, and k2ray.stamp, the hash of the sources it was built from
#   (campaign.sh rebuilds the wheel on the machine when the tree there differs).
#
#   bash bench/gpu/prepare-wheels.sh          # here, before the device call (needs the package registry)
#   bash bench/gpu/prepare-wheels.sh --stamp  # print the source hash only
set -euo pipefail
cd "$(dirname "$0")/../.."

stamp() {
    find k2ray kernels pyproject.toml -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort \
        | xargs sha256sum | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--stamp" ]; then
    stamp
    exit 0
fi

py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
dir=bench/gpu/wheels
DEPS="pydantic pydantic-core annotated-types typing-inspection typing-extensions"
rm -rf "$dir"
mkdir -p "$dir"
pins=()
for name in $DEPS; do
    pin=$(grep -E "^${name}==" requirements.lock | head -1)
    [ -n "$pin" ] || { echo "prepare-wheels.sh: $name is not pinned in requirements.lock" >&2; exit 1; }
    pins+=("$pin")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${pins[@]}"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" .
stamp > "$dir/k2ray.stamp"
ls -la "$dir"
du -sh "$dir"
echo "prepare-wheels.sh: ready; the device call names $dir in carry (see bench/gpu/README.md)"
