// Counter-based normal values for frozen weights drawn at load time (src/model_files/generated.rs).
// Value i of the stream `key` is offset + std·z with z the Box–Muller transform of the two 32-bit
// halves of mix64(key + (i + 1)·φ) (SplitMix64's finaliser, φ = 0x9e3779b97f4a7c15), computed in
// f32 and rounded to bf16. Stateless, so any slice of a stream is drawn on its own and the values
// do not depend on the launch. Launch: any grid (grid-stride loop).
// CPU twin: src/model_files/generated.rs (normal). Checked: src/gpu_check/ops/mod.rs (the
// "generated weights" entries).
#include "common.cuh"

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

extern "C" __global__ void normal_bf16(__nv_bfloat16* out, const uint64_t n, const uint64_t key, const float std,
                                       const float offset) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t h = mix64(key + (i + 1) * 0x9e3779b97f4a7c15ULL);
    const float u1 = ((float)(uint32_t)(h >> 32) + 0.5f) * 2.3283064365386963e-10f;
    const float u2 = ((float)(uint32_t)h + 0.5f) * 2.3283064365386963e-10f;
    const float z = sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958648f * u2);
    out[i] = __float2bfloat16_rn(offset + std * z);
  }
}
