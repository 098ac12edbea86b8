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
// `cross_entropy_rows_in_place_*` writes dx over x (the logits' buffer: the loss consumes them)
// with as many blocks as the GPU holds one of at a time, each looping over rows: one row of a
// 151,936-word vocabulary is 297 KB in bf16, so 132 rows in flight are 39 MB — within an
// H100's 50 MB of L2, so the second pass's reads and the writes over them stay in L2, where
// a block a row with two blocks an SM kept 78 MB in flight and a separate output (2 × 134 MB
// a chunk of 441 rows) went to HBM for the second read (launch/bench/NOTES.md item 65).
// The same arithmetic row by row: the same bits as the allocating entry.
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

// One row: x and dx may be the same buffer (the in-place entry): every thread's reads of the
// first pass end at block_online's barrier before any write of the second, each thread reads
// a pack before writing it, and the target's logit is read before that barrier.
// Each thread loads two packs before adding either (bytes in flight with one block an SM) and
// adds them in the order of the one-pack loop, so the sum's terms, hence the bits, are the
// same.
template <typename T>
__device__ void cross_entropy_row(const T* x, T* dx, const uint32_t t, const float w, float* loss,
                                  const int vocab, const float scale, float* shared_m, float* shared_s) {
  constexpr int P = 16 / sizeof(T);
  constexpr int STRIDE = THREADS * P;
  const bool vec = vocab % P == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dx) % 16 == 0;
  const float xt = threadIdx.x == 0 && t < (uint32_t)vocab ? to_f32(x[t]) : 0.0f;
  float m = -INFINITY, s = 0.0f;
  if (vec) {
    int j = threadIdx.x * P;
    for (; j + STRIDE < vocab; j += 2 * STRIDE) {
      const uint4 raw0 = *reinterpret_cast<const uint4*>(x + j);
      const uint4 raw1 = *reinterpret_cast<const uint4*>(x + j + STRIDE);
      const T* v0 = reinterpret_cast<const T*>(&raw0);
      const T* v1 = reinterpret_cast<const T*>(&raw1);
#pragma unroll
      for (int e = 0; e < P; ++e) online_add(m, s, to_f32(v0[e]));
#pragma unroll
      for (int e = 0; e < P; ++e) online_add(m, s, to_f32(v1[e]));
    }
    if (j < vocab) {
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
  const float c = scale * w;
  if (vec) {
    for (int j = threadIdx.x * P; j < vocab; j += STRIDE) {
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
  if (threadIdx.x == 0) *loss = t < (uint32_t)vocab ? w * (lse - xt) : NAN;
}

#define CE_KERNEL(T, SUFFIX)                                                                              \
  extern "C" __global__ void cross_entropy_rows_##SUFFIX(const T* x, const uint32_t* t, const float* w, T* dx, \
                                                         float* loss, const int vocab, const float scale) {  \
    __shared__ float shared_m[THREADS / 32], shared_s[THREADS / 32];                                     \
    const size_t row = blockIdx.x;                                                                        \
    cross_entropy_row(x + row * vocab, dx + row * vocab, t[row], w[row], loss + row, vocab, scale,        \
                      shared_m, shared_s);                                                                \
  }                                                                                                       \
  extern "C" __global__ void cross_entropy_rows_in_place_##SUFFIX(T* x, const uint32_t* t, const float* w,  \
                                                                  float* loss, const int rows,             \
                                                                  const int vocab, const float scale) {    \
    __shared__ float shared_m[THREADS / 32], shared_s[THREADS / 32];                                     \
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {                                            \
      T* xr = x + (size_t)row * vocab;                                                                    \
      cross_entropy_row(xr, xr, t[row], w[row], loss + row, vocab, scale, shared_m, shared_s);            \
      /* The next row's partials go where this row's second reduction read them. */                      \
      __syncthreads();                                                                                    \
    }                                                                                                     \
  }

CE_KERNEL(float, f32)
CE_KERNEL(__nv_bfloat16, bf16)
CE_KERNEL(__half, f16)
