#!/usr/bin/env bash
# cuDNN headers for the CUDA build (build.rs compiles kernels/cudnn/*.cpp against them): the
# backend headers of the `nvidia-cudnn-cu13` wheel and the header-only cudnn-frontend of the
# `nvidia-cudnn-frontend` wheel, both from PyPI, unpacked once into one include/ folder under
# ${MOEQ_CUDNN_DIR:-$HOME/.cache/moeq-cudnn-9.19-fe1.32}. Prints the export line for build.rs:
#
#   eval "$(launch/fetch-cudnn.sh)"     # then cargo build --features cuda
#
# moeq links no cuDNN library: it opens libcudnn_graph.so.9 at run time (docs/ARCHITECTURE.md,
# decision 26), so the binary runs without cuDNN and uses its own attention kernels then.
# Idempotent; needs python3 with pip and network access to PyPI the first time only (the
# backend wheel is ~370 MB, of which the headers are kept).
set -euo pipefail
backend=9.19.0.56
frontend=1.32.0
dir=${MOEQ_CUDNN_DIR:-$HOME/.cache/moeq-cudnn-9.19-fe1.32}
if [ ! -f "$dir/include/cudnn_graph.h" ] || [ ! -f "$dir/include/cudnn_frontend.h" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for spec in "nvidia-cudnn-cu13==$backend" "nvidia-cudnn-frontend==$frontend"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$tmp" "$spec" >&2
  done
  python3 - "$tmp" "$dir" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
staging = tmp / "unpacked"
# (wheel glob, prefix of the headers inside it)
for pattern, prefix in [("nvidia_cudnn_cu13-*.whl", "nvidia/cudnn/include/"),
                        ("nvidia_cudnn_frontend-*.whl", "include/")]:
    wheel = next(tmp.glob(pattern))
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                out = staging / "include" / name[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(name))
            elif "LICENSE" in name.rsplit("/", 1)[-1].upper():
                lic = staging / "licenses" / f"{wheel.name.split('-')[0]}-{name.rsplit('/', 1)[-1]}"
                lic.parent.mkdir(parents=True, exist_ok=True)
                lic.write_bytes(z.read(name))
if dest.exists():
    shutil.rmtree(dest)
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(staging), str(dest))
PY
  echo "cuDNN $backend headers and cudnn-frontend $frontend in $dir" >&2
fi
echo "export MOEQ_CUDNN_DIR=$dir"
