// The LoRA update added to a projection's output with PEFT's roundings, in place:
//   y[i] = T(y[i] + T(delta[i] · scale))      (delta = lora_B(lora_A(x)) in T)
// 16-byte packs of VEC = 16 / sizeof(T) elements per thread (n % VEC == 0 and both buffers
// 16-byte aligned: the caller checks). Launch: 1-D grid-stride loop over n / VEC packs.
// CPU twin: src/ops/lora_linear.rs (the same two roundings with candle ops).
#include "common.cuh"

template <typename T>
union Pack {
  uint4 v;
  T e[16 / sizeof(T)];
};

template <typename T>
__device__ void lora_add(T* y, const T* delta, const size_t n, const float scale) {
  constexpr int VEC = 16 / sizeof(T);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n / VEC; i += (size_t)gridDim.x * blockDim.x) {
    Pack<T> a, d;
    a.v = reinterpret_cast<const uint4*>(y)[i];
    d.v = reinterpret_cast<const uint4*>(delta)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float scaled = to_f32(from_f32<T>(to_f32(d.e[j]) * scale));
      a.e[j] = from_f32<T>(to_f32(a.e[j]) + scaled);
    }
    reinterpret_cast<uint4*>(y)[i] = a.v;
  }
}

extern "C" __global__ void lora_add_f32(float* y, const float* d, const size_t n, const float s) { lora_add(y, d, n, s); }
extern "C" __global__ void lora_add_bf16(__nv_bfloat16* y, const __nv_bfloat16* d, const size_t n, const float s) {
  lora_add(y, d, n, s);
}
extern "C" __global__ void lora_add_f16(__half* y, const __half* d, const size_t n, const float s) { lora_add(y, d, n, s); }
