// SwiGLU forward: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
// Layout: gate, up, out contiguous with n elements each; computed in f32, one rounding to T.
// Launch: 1-D grid-stride loop, any grid size. CPU twin: src/ops/swiglu.rs (swiglu_cpu).
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* out, const size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float g = to_f32(gate[i]);
    const float u = to_f32(up[i]);
    out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
  }
}

extern "C" __global__ void swiglu_fwd_f32(const float* g, const float* u, float* o, const size_t n) {
  swiglu_fwd(g, u, o, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* o,
                                           const size_t n) {
  swiglu_fwd(g, u, o, n);
}
extern "C" __global__ void swiglu_fwd_f16(const __half* g, const __half* u, __half* o, const size_t n) {
  swiglu_fwd(g, u, o, n);
}
