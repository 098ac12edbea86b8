// Rotary position embedding, transformers' rotate_half convention, fused: x [N, H, D] (D even,
// half = D/2), cos/sin [N, D] (one row per token, shared by the heads), in f32 with one
// rounding to T:
//   y[i]        = x[i]·cos[i]               − x[i+half]·sin[i]
//   y[i+half]   = x[i+half]·cos[i+half]     + x[i]·sin[i+half]
// Backward (cos/sin are tables, no gradient): the transpose of that rotation,
//   dx[i]       = dy[i]·cos[i]              + dy[i+half]·sin[i+half]
//   dx[i+half]  = dy[i+half]·cos[i+half]    − dy[i]·sin[i]
// Launch: 1-D grid-stride over N·H·half pairs. CPU twin: src/ops/rope.rs (rope_cpu).
// Checked: src/gpu_check/ops/mod.rs (the "rope" entries) and src/gpu_check/ops/attention.rs
// ("attention_block").
#include "common.cuh"

template <typename T, bool BWD>
__device__ void rope(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                     T* __restrict__ y, const size_t n, const size_t heads, const size_t half) {
  const size_t pairs = n * heads * half;
  for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
    const size_t i = p % half;
    const size_t row = p / half;  // token · heads + head
    const size_t token = row / heads;
    const T* xr = x + row * 2 * half;
    T* yr = y + row * 2 * half;
    const T* c = cos + token * 2 * half;
    const T* s = sin + token * 2 * half;
    const float a = to_f32(xr[i]), b = to_f32(xr[i + half]);
    const float c1 = to_f32(c[i]), c2 = to_f32(c[i + half]);
    const float s1 = to_f32(s[i]), s2 = to_f32(s[i + half]);
    if (BWD) {
      yr[i] = from_f32<T>(a * c1 + b * s2);
      yr[i + half] = from_f32<T>(b * c2 - a * s1);
    } else {
      yr[i] = from_f32<T>(a * c1 - b * s1);
      yr[i + half] = from_f32<T>(b * c2 + a * s2);
    }
  }
}

#define ROPE(T, SUFFIX)                                                                                \
  extern "C" __global__ void rope_fwd_##SUFFIX(const T* x, const T* c, const T* s, T* y, const size_t n, \
                                               const size_t heads, const size_t half) {                \
    rope<T, false>(x, c, s, y, n, heads, half);                                                        \
  }                                                                                                    \
  extern "C" __global__ void rope_bwd_##SUFFIX(const T* x, const T* c, const T* s, T* y, const size_t n, \
                                               const size_t heads, const size_t half) {                \
    rope<T, true>(x, c, s, y, n, heads, half);                                                         \
  }

ROPE(float, f32)
ROPE(__nv_bfloat16, bf16)
ROPE(__half, f16)
