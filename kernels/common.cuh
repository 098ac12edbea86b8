// Shared helpers for moeq's CUDA kernels: conversions between storage dtypes and the f32
// that every kernel computes in.
// CPU twin: none of its own; from_f32 rounds to nearest even as half's bf16/f16::from_f32 do in
// the CPU twins. Checked through every kernel that includes it (src/gpu_check/).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// 16 bytes as one load or store, or as 16 / sizeof(T) elements.
template <typename T>
union Pack {
  uint4 v;
  T e[16 / sizeof(T)];
};

// Sum (or max) of one float per thread over a block of THREADS threads (a multiple of 32);
// every thread gets the result. `shared` holds THREADS / 32 floats.
template <int THREADS, bool MAX>
__device__ float block_reduce(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffff, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read from a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < THREADS / 32 ? shared[lane] : (MAX ? -INFINITY : 0.0f);
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffff, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  return v;
}

// Sum (or max) of one float per lane over a warp; every lane gets the result.
template <bool MAX>
__device__ __forceinline__ float warp_reduce(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffff, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  return v;
}
