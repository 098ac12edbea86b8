// out = a + b, element-wise over n elements in 16-byte packs (n a multiple of 16 / sizeof(T),
// all three buffers 16-byte aligned: the caller checks), with T's own addition (one rounding
// of the exact sum, as candle's add). Launch: 1-D grid-stride over n / (16 / sizeof(T)) packs.
// CPU twin: candle's add (src/ops/add.rs). Checked: src/gpu_check/ops/mod.rs (the "add" entry).
#include "common.cuh"

template <typename T>
__device__ void add_vec(const T* a, const T* b, T* out, const size_t packs) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < packs; i += (size_t)gridDim.x * blockDim.x) {
    Pack<T> x, y, o;
    x.v = reinterpret_cast<const uint4*>(a)[i];
    y.v = reinterpret_cast<const uint4*>(b)[i];
#pragma unroll
    for (int e = 0; e < 16 / (int)sizeof(T); ++e) o.e[e] = x.e[e] + y.e[e];
    reinterpret_cast<uint4*>(out)[i] = o.v;
  }
}

extern "C" __global__ void add_vec_f32(const float* a, const float* b, float* out, const size_t packs) {
  add_vec(a, b, out, packs);
}
extern "C" __global__ void add_vec_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* out,
                                        const size_t packs) {
  add_vec(a, b, out, packs);
}
extern "C" __global__ void add_vec_f16(const __half* a, const __half* b, __half* out, const size_t packs) {
  add_vec(a, b, out, packs);
}
