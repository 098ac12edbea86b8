// Masked softmax of attention scores, forward and backward, one warp per score row.
// Layout: a block of query rows against a span of the keys: scores/probs/grads [B, H, C, K]
// contiguous, row r = (b·H + h)·C + c is query position i = q0 + c and holds keys k0..k0 + K
// (column j is key k0 + j); segments [B, S] u32 with k0 + K <= S. Query i sees key k0 + j when
// k0 + j <= i, i − (k0 + j) < window (INT_MAX: no window) and segments[b, k0 + j] ==
// segments[b, i] (causal attention within packed sequences, gpt-oss's sliding window); every
// other probability is 0. `sinks` ([H] f32, or null for none) adds one logit per head to each
// of its rows' denominators, not scaled, whose probability is not written. The whole square
// case is C = K = S, q0 = k0 = 0.
//   forward:  p[j] = exp(scale·s[j] − m) / (Σ exp(scale·s[l] − m) over visible l + exp(sink − m))
//             (f32; m the largest of the visible scaled scores and the sink)
//   backward: ds[j] = scale · p[j] · (dp[j] − Σ_l p[l]·dp[l])  (a sink's column has no dp)
// Keys after i are never read. A row of up to 32·CACHED keys is read once into registers;
// longer rows are read again for each pass. Launch: grid ceil(total / WARPS), block 32·WARPS,
// total = B·H·C rows.
// CPU twin: src/ops/attn_softmax.rs (masked_softmax_cpu, masked_softmax_bwd_cpu).
// Checked: src/gpu_check/ops/attention.rs (the "masked_softmax" and, in f32, "attention" entries,
// with and without a window and sinks).
#include "common.cuh"

constexpr int WARPS = 8;
constexpr int CACHED = 64;

template <typename T>
__device__ void masked_softmax_fwd(const T* scores, const uint32_t* segments, T* probs, const int heads,
                                   const int rows, const int keys, const int seq, const int q0, const int k0,
                                   const int window, const int total, const float scale, const float* sinks) {
  const int lane = threadIdx.x % 32;
  const size_t row = (size_t)blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= (size_t)total) return;
  const int i = q0 + row % rows;
  const int last = i - k0;  // column of key i
  const size_t b = row / ((size_t)heads * rows);
  const float sink = sinks != nullptr ? sinks[(row / rows) % heads] : -INFINITY;
  const T* s = scores + row * keys;
  T* p = probs + row * keys;
  const uint32_t* seg = segments + b * seq + k0;  // seg[j]: column j's key
  const uint32_t mine = segments[b * seq + i];
  if (keys <= 32 * CACHED) {
    float v[CACHED];
    float m = -INFINITY;
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      v[t] = j <= last && last - j < window && seg[j] == mine ? scale * to_f32(s[j]) : -INFINITY;
      m = fmaxf(m, v[t]);
    }
    m = fmaxf(warp_reduce<true>(m), sink);  // finite: key i is always visible
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      v[t] = expf(v[t] - m);  // 0 for masked keys
      sum += v[t];
    }
    const float inv = 1.0f / (warp_reduce<false>(sum) + expf(sink - m));
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      if (j < keys) p[j] = from_f32<T>(v[t] * inv);
    }
    return;
  }
  const int first = max(0, last - window + 1);  // no overflow: last >= 0, window >= 1
  float m = -INFINITY;
  for (int j = first + lane; j <= last; j += 32) {
    if (seg[j] == mine) m = fmaxf(m, scale * to_f32(s[j]));
  }
  m = fmaxf(warp_reduce<true>(m), sink);
  float sum = 0.0f;
  for (int j = first + lane; j <= last; j += 32) {
    if (seg[j] == mine) sum += expf(scale * to_f32(s[j]) - m);
  }
  const float inv = 1.0f / (warp_reduce<false>(sum) + expf(sink - m));
  for (int j = lane; j < keys; j += 32) {
    const bool visible = j >= first && j <= last && seg[j] == mine;
    p[j] = from_f32<T>(visible ? expf(scale * to_f32(s[j]) - m) * inv : 0.0f);
  }
}

template <typename T>
__device__ void masked_softmax_bwd(const T* probs, const T* dprobs, T* dscores, const int rows, const int keys,
                                   const int q0, const int k0, const int total, const float scale) {
  const int lane = threadIdx.x % 32;
  const size_t row = (size_t)blockIdx.x * WARPS + threadIdx.x / 32;
  if (row >= (size_t)total) return;
  const int last = q0 + row % rows - k0;  // column of the row's own key
  const T* p = probs + row * keys;
  const T* dp = dprobs + row * keys;
  T* ds = dscores + row * keys;
  if (keys <= 32 * CACHED) {
    float pv[CACHED], dv[CACHED];
    float dot = 0.0f;
#pragma unroll
    for (int t = 0; t < CACHED; ++t) {
      const int j = lane + 32 * t;
      pv[t] = j <= last ? to_f32(p[j]) : 0.0f;
      dv[t] = j <= last ? to_f32(dp[j]) : 0.0f;
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
  for (int j = lane; j <= last; j += 32) dot += to_f32(p[j]) * to_f32(dp[j]);
  dot = warp_reduce<false>(dot);
  for (int j = lane; j < keys; j += 32) {
    const float pj = j <= last ? to_f32(p[j]) : 0.0f;
    ds[j] = from_f32<T>(j <= last ? scale * pj * (to_f32(dp[j]) - dot) : 0.0f);
  }
}

#define SOFTMAX_KERNELS(T, SUFFIX)                                                                          \
  extern "C" __global__ void masked_softmax_fwd_##SUFFIX(                                                  \
      const T* s, const uint32_t* seg, T* p, const int heads, const int rows, const int keys, const int seq, \
      const int q0, const int k0, const int window, const int total, const float scale,                     \
      const float* sinks) {                                                                                 \
    masked_softmax_fwd(s, seg, p, heads, rows, keys, seq, q0, k0, window, total, scale, sinks);            \
  }                                                                                                         \
  extern "C" __global__ void masked_softmax_bwd_##SUFFIX(const T* p, const T* dp, T* ds, const int rows,   \
                                                         const int keys, const int q0, const int k0,        \
                                                         const int total, const float scale) {             \
    masked_softmax_bwd(p, dp, ds, rows, keys, q0, k0, total, scale);                                       \
  }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)
