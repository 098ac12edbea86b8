#!/usr/bin/env bash
# Unsloth for the side-by-side benchmark, packed on the build machine for the GPU machine
# (which has torch, transformers and peft but no network): the wheels below, unpacked into one
# folder (their `studio/` web UI and tests left out: training does not import them), with
# bitsandbytes 0.50.2 and a dist-info for it, xz-compressed into .device/unsloth.tar.xz
# (git-ignored; carry .device). launch/bench/side-by-side.sh unpacks it on the GPU machine.
#
#   bash launch/bench/fetch-unsloth.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 dill multiprocess
  torchao cut_cross_entropy tyro docstring_parser typeguard shtab hf_transfer msgspec json5
  structlog nest_asyncio pydantic pydantic_core annotated_types typing_inspection)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$tmp/wheels" "${wheels[@]}"
site=$tmp/unsloth-site
mkdir -p "$site"
for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$site"; done
rm -rf "$site/studio" "$site/test" "$site"/*.data
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
[ -d .device/py/bitsandbytes ] || bash ../shared/gpu/fetch-bnb.sh .device/py
cp -r .device/py/bitsandbytes "$site/"
mkdir -p "$site/bitsandbytes-0.50.2.dist-info"
printf 'Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n' \
  > "$site/bitsandbytes-0.50.2.dist-info/METADATA"
mkdir -p .device
tar -C "$tmp" -cf - unsloth-site | xz -T2 -6 > .device/unsloth.tar.xz
ls -la .device/unsloth.tar.xz
