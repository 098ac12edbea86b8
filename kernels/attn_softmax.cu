// Masked softmax of attention scores, forward and backward, one warp per score row.
// Layout: a block of query rows against a prefix of the keys: scores/probs/grads [B, H, C, K]
// contiguous, row r = (b·H + h)·C + c is query position i = q0 + c and sees keys 0..K; segments
// [B, S] u32 with K <= S. Query i sees key j when j <= i and segments[b, j] == segments[b, i]
// (causal attention within packed sequences); every other probability is 0. The whole square
// case is C = K = S, q0 = 0.
//   forward:  p[j] = exp(scale·s[j] − m) / Σ exp(scale·s[l] − m) over visible l (f32)
//   backward: ds[j] = scale · p[j] · (dp[j] − Σ_l p[l]·dp[l])
// Keys after i are never read. A row of up to 32·CACHED keys is read once into registers;
// longer rows are read again for each pass. Launch: grid ceil(total / WARPS), block 32·WARPS,
// total = B·H·C rows.
// CPU twin: src/ops/attn_softmax.rs (masked_softmax_cpu, masked_softmax_bwd_cpu).
// Checked: src/gpu_check/ops/attention.rs (the "masked_softmax" and, in f32, "attention" entries).
#include "common.cuh"

constexpr int WARPS = 8;
constexpr int CACHED = 64;

template <typename T>
__device__ void masked_softmax_fwd(const T* scores, const uint32_t* segments, T* probs, const int heads,
                                   const int rows, const int keys, const int seq, const int q0,
                                   const int total, const float scale) {
  const int lane = threadIdx.x % 32;
  const size_t row = (size_t)blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= (size_t)total) return;
  const int i = q0 + row % rows;
  const size_t b = row / ((size_t)heads * rows);
  const T* s = scores + row * keys;
  T* p = probs + row * keys;
  const uint32_t* seg = segments + b * seq;
  const uint32_t mine = seg[i];
  if (keys <= 32 * CACHED) {
    float v[CACHED];
    float m = -INFINITY;
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      v[t] = j <= i && seg[j] == mine ? scale * to_f32(s[j]) : -INFINITY;
      m = fmaxf(m, v[t]);
    }
    m = warp_reduce<true>(m);  // finite: key i is always visible
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      v[t] = expf(v[t] - m);  // 0 for masked keys
      sum += v[t];
    }
    const float inv = 1.0f / warp_reduce<false>(sum);
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      if (j < keys) p[j] = from_f32<T>(v[t] * inv);
    }
    return;
  }
  float m = -INFINITY;
  for (int j = lane; j <= i; j += 32) {
    if (seg[j] == mine) m = fmaxf(m, scale * to_f32(s[j]));
  }
  m = warp_reduce<true>(m);
  float sum = 0.0f;
  for (int j = lane; j <= i; j += 32) {
    if (seg[j] == mine) sum += expf(scale * to_f32(s[j]) - m);
  }
  const float inv = 1.0f / warp_reduce<false>(sum);
  for (int j = lane; j < keys; j += 32) {
    const bool visible = j <= i && seg[j] == mine;
    p[j] = from_f32<T>(visible ? expf(scale * to_f32(s[j]) - m) * inv : 0.0f);
  }
}

template <typename T>
__device__ void masked_softmax_bwd(const T* probs, const T* dprobs, T* dscores, const int rows, const int keys,
                                   const int q0, const int total, const float scale) {
  const int lane = threadIdx.x % 32;
  const size_t row = (size_t)blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= (size_t)total) return;
  const int i = q0 + row % rows;
  const T* p = probs + row * keys;
  const T* dp = dprobs + row * keys;
  T* ds = dscores + row * keys;
  if (keys <= 32 * CACHED) {
    float pv[CACHED], dv[CACHED];
    float dot = 0.0f;
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      pv[t] = j <= i ? to_f32(p[j]) : 0.0f;
      dv[t] = j <= i ? to_f32(dp[j]) : 0.0f;
      dot += pv[t] * dv[t];
    }
    dot = warp_reduce<false>(dot);
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      if (j < keys) ds[j] = from_f32<T>(scale * pv[t] * (dv[t] - dot));
    }
    return;
  }
  float dot = 0.0f;
  for (int j = lane; j <= i; j += 32) dot += to_f32(p[j]) * to_f32(dp[j]);
  dot = warp_reduce<false>(dot);
  for (int j = lane; j < keys; j += 32) {
    const float pj = j <= i ? to_f32(p[j]) : 0.0f;
    ds[j] = from_f32<T>(j <= i ? scale * pj * (to_f32(dp[j]) - dot) : 0.0f);
  }
}

#define SOFTMAX_KERNELS(T, SUFFIX)                                                                    \
  extern "C" __global__ void masked_softmax_fwd_##SUFFIX(const T* s, const uint32_t* seg, T* p,      \
                                                         const int heads, const int rows,            \
                                                         const int keys, const int seq, const int q0, \
                                                         const int total, const float scale) {       \
    masked_softmax_fwd(s, seg, p, heads, rows, keys, seq, q0, total, scale);                        \
  }                                                                                                   \
  extern "C" __global__ void masked_softmax_bwd_##SUFFIX(const T* p, const T* dp, T* ds, const int rows, \
                                                         const int keys, const int q0,               \
                                                         const int total, const float scale) {       \
    masked_softmax_bwd(p, dp, ds, rows, keys, q0, total, scale);                                    \
  }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)
