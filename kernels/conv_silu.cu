// Gated DeltaNet's causal depthwise conv1d followed by SiLU, forward and backward.
// CPU twin: src/ops/conv_silu_op.rs (`forward_cpu`, `backward_cpu`: the same sums in the same
// order, the same roundings). Reference: src/ops/linear_attn_parts.rs (`causal_conv1d_silu`, candle
// ops with autograd). Checked: src/gpu_check/ops/conv_silu.rs.
//
// x [B, T, C] and w [C, K] of one dtype S; y [B, T, C] in S. Per element, with x = 0 before t = 0:
//   v = round_S(Σ_k x[t + k − (K−1), c]·w[c, k])   (f32, taps in order, no FMA: as the reference)
//   y = round_S(v·σ(v))
// Backward, as autograd through the reference rounds it:
//   dv[t, c] = round_S(dy·σ(v)·(1 + v·(1 − σ(v))))        (conv_silu_dv, kept in f32)
//   dx[t, c] = round_S(Σ_k w[c, k]·dv[t + (K−1) − k, c])  (conv_silu_dx)
//   dw[c, k] = round_S(Σ_b Σ_t dv[b, t, c]·x[b, t + k − (K−1), c])   (conv_silu_dw, only when asked)
#include "common.cuh"

template <typename S>
__device__ __forceinline__ float preact(const S* x, const S* w, long long bt, int t, int c, int C, int K) {
  float acc = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int back = K - 1 - k;
    if (t >= back) acc = __fadd_rn(acc, __fmul_rn(to_f32(x[(bt - back) * C + c]), to_f32(w[(size_t)c * K + k])));
  }
  return to_f32(from_f32<S>(acc));
}

template <typename S>
__device__ void fwd(const S* x, const S* w, S* y, long long n, int T, int C, int K) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long bt = i / C;
  const int c = (int)(i % C), t = (int)(bt % T);
  const float v = preact(x, w, bt, t, c, C, K);
  y[i] = from_f32<S>(v / (1.0f + expf(-v)));
}

template <typename S>
__device__ void dv(const S* x, const S* w, const S* dy, float* d, long long n, int T, int C, int K) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long bt = i / C;
  const int c = (int)(i % C), t = (int)(bt % T);
  const float v = preact(x, w, bt, t, c, C, K);
  const float s = 1.0f / (1.0f + expf(-v));
  d[i] = to_f32(from_f32<S>(to_f32(dy[i]) * (s * (1.0f + v * (1.0f - s)))));
}

template <typename S>
__device__ void dx(const float* d, const S* w, S* out, long long n, int T, int C, int K) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long bt = i / C;
  const int c = (int)(i % C), t = (int)(bt % T);
  float acc = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int ahead = K - 1 - k;
    if (t + ahead < T) acc = __fadd_rn(acc, __fmul_rn(to_f32(w[(size_t)c * K + k]), d[(bt + ahead) * C + c]));
  }
  out[i] = from_f32<S>(acc);
}

// One thread per (c, k), the tokens in order: the same sum at every run.
template <typename S>
__device__ void dw(const float* d, const S* x, S* out, int B, int T, int C, int K) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= C * K) return;
  const int c = i % C, k = i / C, back = K - 1 - k;
  float acc = 0.0f;
  for (int b = 0; b < B; ++b)
    for (int t = back; t < T; ++t) {
      const long long bt = (long long)b * T + t;
      acc = __fadd_rn(acc, __fmul_rn(d[bt * C + c], to_f32(x[(bt - back) * C + c])));
    }
  out[(size_t)c * K + k] = from_f32<S>(acc);
}

#define CONV_SILU(S, NAME)                                                                                       \
  extern "C" __global__ void conv_silu_fwd_##NAME(const S* x, const S* w, S* y, const long long n, const int T,  \
                                                   const int C, const int K) {                                     \
    fwd<S>(x, w, y, n, T, C, K);                                                                                  \
  }                                                                                                               \
  extern "C" __global__ void conv_silu_dv_##NAME(const S* x, const S* w, const S* dy, float* d, const long long n, \
                                                  const int T, const int C, const int K) {                       \
    dv<S>(x, w, dy, d, n, T, C, K);                                                                               \
  }                                                                                                               \
  extern "C" __global__ void conv_silu_dx_##NAME(const float* d, const S* w, S* out, const long long n,          \
                                                  const int T, const int C, const int K) {                       \
    dx<S>(d, w, out, n, T, C, K);                                                                                 \
  }                                                                                                               \
  extern "C" __global__ void conv_silu_dw_##NAME(const float* d, const S* x, S* out, const int B, const int T,   \
                                                  const int C, const int K) {                                    \
    dw<S>(d, x, out, B, T, C, K);                                                                                 \
  }
CONV_SILU(float, f32)
CONV_SILU(__nv_bfloat16, bf16)
CONV_SILU(__half, f16)
