// Cross-entropy of logit rows with its gradient, one block per row (src/train/loss.rs):
//   logits x [R, V] (compute dtype), targets t [R] u32, row weights w [R] f32 (0 = ignored row)
//   lse      = log Σ_j exp(x_j)                      (f32, max-shifted)
//   loss[r]  = w · (lse − x_t)                       (f32)
//   dx_j     = scale · w · (exp(x_j − lse) − [j = t])  (the logits' dtype)
// Three passes over the row (max, sum, write), so the f32 probabilities never exist in memory.
// A target outside the vocabulary gives a NaN loss (and no one-hot term) instead of a stray read.
// Launch: grid R, block 1024. CPU twin: src/ops/cross_entropy.rs (cross_entropy_rows_cpu).
// Checked: src/gpu_check/ops/mod.rs (the "cross_entropy_rows" entries: loss and dlogits).
#include "common.cuh"

constexpr int THREADS = 1024;

template <typename T>
__device__ void cross_entropy_rows(const T* logits, const uint32_t* targets, const float* weights, T* dlogits,
                                   float* loss, const int vocab, const float scale) {
  __shared__ float shared[THREADS / 32];
  const size_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* dx = dlogits + row * vocab;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += THREADS) m = fmaxf(m, to_f32(x[j]));
  m = block_reduce<THREADS, true>(m, shared);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < vocab; j += THREADS) sum += expf(to_f32(x[j]) - m);
  const float lse = logf(block_reduce<THREADS, false>(sum, shared)) + m;
  const float w = weights[row];
  const uint32_t t = targets[row];
  for (int j = threadIdx.x; j < vocab; j += THREADS) {
    const float p = expf(to_f32(x[j]) - lse) - (j == (int)t ? 1.0f : 0.0f);
    dx[j] = from_f32<T>(scale * w * p);
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
