# Sourced by the scripts that run on the GPU machine (repository root): $OUT exists, the CUDA
# and NCCL libraries of the machine's PyTorch wheels are on the library path, and the binary
# carried in .device/ (launch/gpu-check.sh build: moeq and moeq-launch) is unpacked.
OUT=${OUT:-/tmp/moeq-gpu-out}
mkdir -p "$OUT"
SP=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
if [ -d "$SP" ]; then
  export LD_LIBRARY_PATH=$SP/cu13/lib:$SP/nccl/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
fi
for f in .device/*.xz; do [ -e "$f" ] && xz -dkf "$f"; done
chmod +x .device/moeq
[ -e .device/moeq-launch ] && chmod +x .device/moeq-launch || true
# cuDNN for the fused attention (ops::cudnn_attn): the PyTorch wheel's, required by gpu-check.
if [ -d "$SP/cudnn/lib" ]; then
  export MOEQ_CUDNN_LIB=${MOEQ_CUDNN_LIB:-$SP/cudnn/lib} MOEQ_REQUIRE_CUDNN=${MOEQ_REQUIRE_CUDNN:-1}
fi
