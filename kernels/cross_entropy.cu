// Cross-entropy of logit rows with its gradient, one block per row (src/train/loss.rs):
//   logits x [R, V] (compute dtype), targets t [R] u32, row weights w [R] f32 (0 = ignored row)
//   lse      = log Σ_j exp(x_j)                      (f32, max-shifted)
//   loss[r]  = w · (lse − x_t)                       (f32)
//   dx_j     = scale · w · (exp(x_j − lse) − [j = t])  (the logits' dtype)
// Two passes over the row: the max and the sum of exp(x − max) together (online: the sum is
// rescaled when the max grows; pairs combine as (m, s) ⊕ (m', s') = (M, s·e^(m−M) + s'·e^(m'−M))),
// then the write; so the f32 probabilities never exist in memory. Rows whose start is 16-byte
// aligned in both buffers with V a multiple of 16 / sizeof(T) move 16 bytes per load and store
// (the same values: only the order of the sum's terms depends on it).
// A target outside the vocabulary gives a NaN loss (and no one-hot term) instead of a stray read.
// Launch: grid R, block 1024. CPU twin: src/ops/cross_entropy.rs (cross_entropy_rows_cpu).
// Checked: src/gpu_check/ops/mod.rs (the "cross_entropy_rows" entries: loss and dlogits).
#include "common.cuh"

constexpr int THREADS = 1024;

// Adds exp(x − m) to the running (m, s).
__device__ __forceinline__ void online_add(float& m, float& s, const float x) {
  if (x == -INFINITY) return;
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

// (m, s) ⊕ (m2, s2).
__device__ __forceinline__ void online_merge(float& m, float& s, const float m2, const float s2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) return;
  s = (m == -INFINITY ? 0.0f : s * expf(m - M)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - M));
  m = M;
}

// The block's (max, sum of exp(x − max)); every thread gets it.
__device__ void block_online(float& m, float& s, float* shared_m, float* shared_s) {
  for (int o = 16; o > 0; o >>= 1) {
    online_merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  m = lane < THREADS / 32 ? shared_m[lane] : -INFINITY;
  s = lane < THREADS / 32 ? shared_s[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) {
    online_merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
  }
}

template <typename T>
__device__ void cross_entropy_rows(const T* logits, const uint32_t* targets, const float* weights, T* dlogits,
                                   float* loss, const int vocab, const float scale) {
  __shared__ float shared_m[THREADS / 32], shared_s[THREADS / 32];
  constexpr int P = 16 / sizeof(T);
  const size_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* dx = dlogits + row * vocab;
  const bool vec = vocab % P == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dx) % 16 == 0;
  float m = -INFINITY, s = 0.0f;
  if (vec) {
    for (int j = threadIdx.x * P; j < vocab; j += THREADS * P) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + j);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < P; ++e) online_add(m, s, to_f32(v[e]));
    }
  } else {
    for (int j = threadIdx.x; j < vocab; j += THREADS) online_add(m, s, to_f32(x[j]));
  }
  block_online(m, s, shared_m, shared_s);
  const float lse = logf(s) + m;
  const float w = weights[row];
  const uint32_t t = targets[row];
  const float c = scale * w;
  if (vec) {
    for (int j = threadIdx.x * P; j < vocab; j += THREADS * P) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + j);
      const T* v = reinterpret_cast<const T*>(&raw);
      uint4 packed;
      T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float p = expf(to_f32(v[e]) - lse) - (j + e == (int)t ? 1.0f : 0.0f);
        o[e] = from_f32<T>(c * p);
      }
      *reinterpret_cast<uint4*>(dx + j) = packed;
    }
  } else {
    for (int j = threadIdx.x; j < vocab; j += THREADS) {
      const float p = expf(to_f32(x[j]) - lse) - (j == (int)t ? 1.0f : 0.0f);
      dx[j] = from_f32<T>(c * p);
    }
  }
  if (threadIdx.x == 0) loss[row] = t < (uint32_t)vocab ? w * (lse - to_f32(x[t])) : NAN;
}

#define CE_KERNEL(T, SUFFIX)                                                                              \
  extern "C" __global__ void cross_entropy_rows_##SUFFIX(const T* x, const uint32_t* t, const float* w, T* dx, \
                                                         float* loss, const int vocab, const float scale) {  \
    cross_entropy_rows(x, t, w, dx, loss, vocab, scale);                                                  \
  }

CE_KERNEL(float, f32)
CE_KERNEL(__nv_bfloat16, bf16)
CE_KERNEL(__half, f16)
