// The gated delta rule's pass over chunks (the chunked form's only sequential part), forward and
// backward, in f32. CPU twin: src/ops/delta_carry_op.rs (`walk`: the same loops). Its reference:
// the chunk loop of src/ops/delta_rule.rs (`chunked`); tests/delta_rule.rs proves the chunkwise
// form built on it against autograd through `recurrent`. Checked: src/gpu_check/ops/delta_rule.rs.
//
// Layouts (all f32, row-major; BH = batch × heads, N chunks of C positions):
//   wk   [BH, N, C, 2Dk]                 W | K̃ per position of each chunk
//   us   [BH, N·(C+1) + Dk, Dv]          per chunk: C rows of U, then one row of the chunk's
//                                        decay exp(c_C) (the same in every column); then the
//                                        initial state S_0
//   out  [BH, N·C + (N+1)·Dk, Dv]        rows 0..N·C: Y per chunk; then slots 0..N of Dk rows
// Forward, n = 0..N−1 (G = S_0 first):   Y = U_n − W_n G;   G = d_n G + K̃_nᵀ Y
//   out: Y = V'_n, slot m = S_m (the state entering chunk m; slot N the final state).
// Backward, n = N−1..0, from `dout` (out's gradient: dV' rows, dS_m slots; G = dS_N first):
//                                        Y = dV'_n + K̃_n G;  G = dS_n + d_n G − W_nᵀ Y
//   out: Y = the total gradient of V'_n (= dU_n), slot m = the total gradient of S_m (slot 0:
//   the initial state's). The products over Dv (dW, dK̃, the decays') are the host's.
//
// The columns of the state are independent, so a block takes one head (blockIdx.x) and 32
// columns (blockIdx.y), a lane per column; 16 warps split the rows: Y's C ≤ 64 rows in blocks of
// 4, the state's Dk rows in blocks of RG (the state lives in registers, mirrored in shared
// memory for the products). Each chunk's rows of wk are first copied to shared memory by the
// whole block (coalesced float4, Dk % 4 == 0), then read as float4 broadcasts (the same address
// for every lane of a warp): read straight from global memory, the products waited on L2 with
// only 8 warps per SM (2.1 ms per forward call at 32 heads × 2,048 positions, Nsight; 0.78 ms
// staged, still with blocks of 8 warps, which have 16 since). Shared: (2·C·Dk + (Dk + C)·32) floats,
// 88 KiB at C = 64, Dk = 128.
#include "common.cuh"

constexpr int WARPS = 16, COLS = 32, RY = 4;  // C ≤ WARPS·RY = 64

template <int RG, bool BACK>
__device__ void carry(const float* wk, const float* us, const float* dout, float* out, int N, int C, int Dk,
                      int Dv) {
  extern __shared__ float4 sh4[];  // R [C][2Dk] (the chunk's rows of wk), G [Dk][COLS], Y [C][COLS]
  float* R = reinterpret_cast<float*>(sh4);
  float* G = R + C * 2 * Dk;
  float* Y = G + Dk * COLS;
  const int bh = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.y * COLS + lane;
  const bool col = j < Dv;
  const size_t us_rows = (size_t)N * (C + 1) + Dk, out_rows = (size_t)N * C + (size_t)(N + 1) * Dk;
  const size_t slots = (size_t)N * C;  // out's row of slot 0
  const float* u = us + bh * us_rows * Dv;
  const float* d_out = BACK ? dout + bh * out_rows * Dv : nullptr;
  float* o = out + bh * out_rows * Dv;
  const float* rows = wk + (size_t)bh * N * C * 2 * Dk;
  const float sign_a = BACK ? 1.0f : -1.0f, sign_b = BACK ? -1.0f : 1.0f;

  float g[RG] = {};
  {
    const int first = BACK ? N : 0;
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      const int d = warp * RG + r;
      if (d >= Dk) continue;
      g[r] = !col ? 0.0f : BACK ? d_out[(slots + (size_t)N * Dk + d) * Dv + j] : u[((size_t)N * (C + 1) + d) * Dv + j];
      G[d * COLS + lane] = g[r];
      if (col) o[(slots + (size_t)first * Dk + d) * Dv + j] = g[r];
    }
  }
  __syncthreads();
  for (int step = 0; step < N; ++step) {
    const int n = BACK ? N - 1 - step : step;
    {
      const float4* chunk = reinterpret_cast<const float4*>(rows + (size_t)n * C * 2 * Dk);
      for (int e = threadIdx.x; e < C * Dk / 2; e += blockDim.x) sh4[e] = chunk[e];
    }
    __syncthreads();
    const float* A = R + (BACK ? Dk : 0);  // W forward, K̃ backward
    const float* B = R + (BACK ? 0 : Dk);  // K̃ forward, W backward
    // Y = X + sign_a · A G, rows i = warp·RY + r.
    float acc[RY];
#pragma unroll
    for (int r = 0; r < RY; ++r) acc[r] = 0.0f;
    for (int d = 0; d < Dk; d += 4) {
      const float g0 = G[d * COLS + lane], g1 = G[(d + 1) * COLS + lane];
      const float g2 = G[(d + 2) * COLS + lane], g3 = G[(d + 3) * COLS + lane];
#pragma unroll
      for (int r = 0; r < RY; ++r) {
        const int i = warp * RY + r;
        if (i < C) {
          const float4 a = *reinterpret_cast<const float4*>(A + i * 2 * Dk + d);
          acc[r] += a.x * g0 + a.y * g1 + a.z * g2 + a.w * g3;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RY; ++r) {
      const int i = warp * RY + r;
      if (i >= C) continue;
      const float x = !col ? 0.0f : BACK ? d_out[((size_t)n * C + i) * Dv + j] : u[((size_t)n * (C + 1) + i) * Dv + j];
      const float y = x + sign_a * acc[r];
      Y[i * COLS + lane] = y;
      if (col) o[((size_t)n * C + i) * Dv + j] = y;
    }
    __syncthreads();
    // G = E + decay · G + sign_b · Bᵀ Y, rows d = warp·RG + r (E = dS_n backward, 0 forward).
    float acc2[RG];
#pragma unroll
    for (int r = 0; r < RG; ++r) acc2[r] = 0.0f;
    for (int i = 0; i < C; ++i) {
      const float y = Y[i * COLS + lane];
      const float* b = B + i * 2 * Dk + warp * RG;
#pragma unroll
      for (int r = 0; r < RG; r += 4) {
        if (warp * RG + r < Dk) {
          const float4 bb = *reinterpret_cast<const float4*>(b + r);
          acc2[r] += bb.x * y;
          acc2[r + 1] += bb.y * y;
          acc2[r + 2] += bb.z * y;
          acc2[r + 3] += bb.w * y;
        }
      }
    }
    const float decay = col ? u[((size_t)n * (C + 1) + C) * Dv + j] : 0.0f;
    const int slot = BACK ? n : n + 1;
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      const int d = warp * RG + r;
      if (d >= Dk) continue;
      const float e = BACK && col ? d_out[(slots + (size_t)n * Dk + d) * Dv + j] : 0.0f;
      g[r] = e + decay * g[r] + sign_b * acc2[r];
      G[d * COLS + lane] = g[r];
      if (col) o[(slots + (size_t)slot * Dk + d) * Dv + j] = g[r];
    }
    __syncthreads();
  }
}

// Entry points per RG (state rows per warp, a multiple of 4): Dk ≤ 16·RG. Grid (BH, ⌈Dv/32⌉),
// 512 threads, (2·C·Dk + (Dk + C)·32)·4 bytes of shared memory. Compiled for 512 threads
// (__launch_bounds__): without it ptxas gave the RG = 16 backward 142 registers a thread, more
// than a 512-thread block can have.
#define DELTA_CARRY(RG)                                                                                        \
  extern "C" __global__ void __launch_bounds__(WARPS * 32) delta_carry_fwd_r##RG(const float* wk, const float* us, float* out, const int N,  \
                                                   const int C, const int Dk, const int Dv) {                 \
    carry<RG, false>(wk, us, nullptr, out, N, C, Dk, Dv);                                                     \
  }                                                                                                           \
  extern "C" __global__ void __launch_bounds__(WARPS * 32) delta_carry_bwd_r##RG(const float* wk, const float* us, const float* dout,       \
                                                   float* out, const int N, const int C, const int Dk,       \
                                                   const int Dv) {                                            \
    carry<RG, true>(wk, us, dout, out, N, C, Dk, Dv);                                                         \
  }
DELTA_CARRY(4)
DELTA_CARRY(8)
DELTA_CARRY(16)
