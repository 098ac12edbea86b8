#!/usr/bin/env bash
# CUTLASS headers for the CUDA build (build.rs compiles kernels/sm90/*.cu against them): the
# `nvidia-cutlass` wheel from PyPI, its include/ and tools/util/include/ unpacked once into
# ${MOEQ_CUTLASS_DIR:-$HOME/.cache/moeq-cutlass-4.2.0}. Prints the export line for build.rs:
#
#   eval "$(launch/fetch-cutlass.sh)"     # then cargo build --features cuda
#
# Idempotent; needs python3 with pip and network access to PyPI the first time only.
set -euo pipefail
version=4.2.0.0
dir=${MOEQ_CUTLASS_DIR:-$HOME/.cache/moeq-cutlass-4.2.0}
if [ ! -f "$dir/include/cutlass/cutlass.h" ] || [ ! -f "$dir/tools/util/include/cutlass/util/packed_stride.hpp" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "nvidia-cutlass==$version" >&2
  python3 - "$tmp" "$dir" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("nvidia_cutlass-*.whl"))
prefix = "cutlass_library/source/"
staging = tmp / "unpacked"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel and (rel.startswith("include/") or rel.startswith("tools/util/include/")):
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
        elif name.endswith("/licenses/LICENSE.txt"):
            (staging / "LICENSE.txt").parent.mkdir(parents=True, exist_ok=True)
            (staging / "LICENSE.txt").write_bytes(z.read(name))
if dest.exists():
    shutil.rmtree(dest)
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(staging), str(dest))
PY
  echo "CUTLASS $version headers in $dir" >&2
fi
echo "export MOEQ_CUTLASS_DIR=$dir"
