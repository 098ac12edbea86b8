// lora_outer: the weight gradients of grouped (per-expert) LoRA factors, where the reduction
// runs over each expert's rows:
//   out[(e·r + j)·n + c] = T(alpha · Σ_{row in group g} R[row·r + j] · X[row·n + c])
// for groups g (expert e = groups[3g], first row groups[3g+1], rows groups[3g+2]); R [M, r]
// (the rank-r side), X [M, n]. cuBLAS's grouped GEMM runs these k = rows products as one
// launch per group; here one block per (128 columns, group, 16 of the r) keeps 16 f32
// accumulators per thread (one column), staging 32 rows of R in shared memory at a time: X
// is read once per 16 of r, coalesced. f32 accumulation in row order, one rounding.
// Launch: grid (ceil(n/128), groups, ceil(r/16)), block 128. CPU twin: src/ops/grouped_gemm.rs
// (`grouped_outer`, the same products as candle matmuls through `grouped_gemm`).
// Checked: src/gpu_check/ops/outer.rs (the "grouped_outer" entries).
#include "common.cuh"

constexpr int OUTER_COLS = 128;
constexpr int OUTER_RANK = 16;
constexpr int OUTER_ROWS = 32;

template <typename T>
__device__ void lora_outer(const T* R, const T* X, const uint32_t* groups, T* out, const int r, const int n,
                           const float alpha) {
  __shared__ float rs[OUTER_ROWS][OUTER_RANK];
  const int g = blockIdx.y;
  const size_t e = groups[3 * g], first = groups[3 * g + 1], rows = groups[3 * g + 2];
  const int j0 = blockIdx.z * OUTER_RANK;
  const int c = blockIdx.x * OUTER_COLS + threadIdx.x;
  float acc[OUTER_RANK];
#pragma unroll
  for (int j = 0; j < OUTER_RANK; ++j) acc[j] = 0.0f;
  for (size_t t0 = 0; t0 < rows; t0 += OUTER_ROWS) {
    // Stage R[first + t0 .. +32][j0 .. j0 + 16] (zeros past the group or the rank).
    for (int i = threadIdx.x; i < OUTER_ROWS * OUTER_RANK; i += blockDim.x) {
      const int tr = i / OUTER_RANK, j = i % OUTER_RANK;
      const size_t row = t0 + tr;
      rs[tr][j] = (row < rows && j0 + j < r) ? to_f32(R[(first + row) * r + j0 + j]) : 0.0f;
    }
    __syncthreads();
    if (c < n) {
      const size_t end = rows - t0 < OUTER_ROWS ? rows - t0 : OUTER_ROWS;
      for (size_t tr = 0; tr < end; ++tr) {
        const float x = to_f32(X[(first + t0 + tr) * n + c]);
#pragma unroll
        for (int j = 0; j < OUTER_RANK; ++j) acc[j] += rs[tr][j] * x;
      }
    }
    __syncthreads();
  }
  if (c < n) {
#pragma unroll
    for (int j = 0; j < OUTER_RANK; ++j) {
      if (j0 + j < r) out[(e * r + j0 + j) * n + c] = from_f32<T>(alpha * acc[j]);
    }
  }
}

#define LORA_OUTER(T, SUFFIX)                                                                         \
  extern "C" __global__ void lora_outer_##SUFFIX(const T* R, const T* X, const uint32_t* groups, T* out, \
                                                 const int r, const int n, const float alpha) {        \
    lora_outer<T>(R, X, groups, out, r, n, alpha);                                                    \
  }
LORA_OUTER(float, f32)
LORA_OUTER(__nv_bfloat16, bf16)
LORA_OUTER(__half, f16)
