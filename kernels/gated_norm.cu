// Gated DeltaNet's gated RMSNorm (src/ops/gated_norm_op.rs has the equations), one warp per row
// of x [rows, d], x, gate, w and the outputs of one dtype T, the weight frozen:
//   r = 1/√(mean(x²) + eps);  n = round(x·r);  p = round(n·w);  y = round(p·silu(gate))
// Backward (f32, rounded once): dgate = dy·p·σ(gate)·(1 + gate·(1 − σ(gate)));
//   g = dy·silu(gate)·w;  dx = r·(g − x·r·mean(g·x·r)).
// Sums over lanes, then across the warp (the CPU twin sums in index order: f32 ulps).
// CPU twin: src/ops/gated_norm_op.rs. Checked: src/gpu_check/ops/linear_attn.rs ("gated_norm").
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f(const float v) { return 1.0f / (1.0f + expf(-v)); }
// SiLU as candle computes it (and the CPU twin): v / (1 + e^−v).
__device__ __forceinline__ float silu_f(const float v) { return v / (1.0f + expf(-v)); }

template <typename T>
__device__ float inv_rms(const T* x, const int d, const float eps) {
  float ss = 0.0f;
  for (int i = threadIdx.x % 32; i < d; i += 32) {
    const float v = to_f32(x[i]);
    ss += v * v;
  }
  return 1.0f / sqrtf(warp_reduce<false>(ss) / d + eps);
}

template <typename T>
__device__ void norm_fwd(const T* x, const T* gate, const T* w, T* y, const long long rows, const int d,
                         const float eps) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const long long off = row * d;
  const float r = inv_rms(x + off, d, eps);
  for (int i = threadIdx.x % 32; i < d; i += 32) {
    const float n = to_f32(from_f32<T>(to_f32(x[off + i]) * r));
    const float p = to_f32(from_f32<T>(n * to_f32(w[i])));
    const float g = to_f32(gate[off + i]);
    y[off + i] = from_f32<T>(p * silu_f(g));
  }
}

template <typename T>
__device__ void norm_bwd(const T* x, const T* gate, const T* w, const T* dy, T* dx, T* dgate, const long long rows,
                         const int d, const float eps) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const long long off = row * d;
  const int lane = threadIdx.x % 32;
  const float r = inv_rms(x + off, d, eps);
  float gn = 0.0f;
  for (int i = lane; i < d; i += 32) {
    const float g = to_f32(gate[off + i]);
    gn += to_f32(dy[off + i]) * silu_f(g) * to_f32(w[i]) * (to_f32(x[off + i]) * r);
  }
  const float mean_gn = warp_reduce<false>(gn) / d;
  for (int i = lane; i < d; i += 32) {
    const float xv = to_f32(x[off + i]), g = to_f32(gate[off + i]), s = sigmoid_f(g), up = to_f32(dy[off + i]);
    const float p = to_f32(from_f32<T>(to_f32(from_f32<T>(xv * r)) * to_f32(w[i])));
    dgate[off + i] = from_f32<T>(up * p * (s * (1.0f + g * (1.0f - s))));
    dx[off + i] = from_f32<T>(r * (up * silu_f(g) * to_f32(w[i]) - xv * r * mean_gn));
  }
}

#define GATED_NORM(T, NAME)                                                                                          \
  extern "C" __global__ void gated_norm_fwd_##NAME(const T* x, const T* gate, const T* w, T* y, const long long rows, \
                                                   const int d, const float eps) {                                   \
    norm_fwd<T>(x, gate, w, y, rows, d, eps);                                                                        \
  }                                                                                                                  \
  extern "C" __global__ void gated_norm_bwd_##NAME(const T* x, const T* gate, const T* w, const T* dy, T* dx,        \
                                                   T* dgate, const long long rows, const int d, const float eps) {   \
    norm_bwd<T>(x, gate, w, dy, dx, dgate, rows, d, eps);                                                            \
  }
GATED_NORM(float, f32)
GATED_NORM(__nv_bfloat16, bf16)
GATED_NORM(__half, f16)
