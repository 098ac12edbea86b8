// The products of grouped (per-expert) LoRA on tensor cores, bf16 in, f32 accumulation
// (mma.sync m16n8k16): rows sorted by expert, one side of every product of rank r ≤ 64
// (r % 8 == 0; zero-padded to RP = 16, 32 or 64 inside the kernels). Three shapes cover an
// expert adapter's forward and backward (src/ops/thin_gemm.rs):
//
//   lora_project:  H[row, j]  = T(α · Σ_k X[row, k] · W_e[j, k])        X [M, K], W [E, r, K]
//                  (the rank-r hidden x·Aᵀ, and dh = s·dy·B through Bᵀ stored [E, r, out])
//   lora_expand:   Y[row, n]  = T(Y[row, n] + T(α · Σ_j H[row, j] · V_e[n, j]))   (or without Y)
//                  H [M, r], V [E, N, r] (the update s·h·Bᵀ added to the base projection's
//                  output, and dx = dh·A through A stored [E, in, r] added to the base dx)
//   lora_outer_mma: D[e, j, n] = T(α · Σ_{rows of e} R[row, j] · X[row, n])   R [M, r], X [M, N]
//                  (the factors' weight gradients, reduced over each expert's rows), in two
//                  kernels: f32 partial sums over chunks of ≤ 256 rows of a group into a
//                  workspace [chunks, r, N], then `lora_outer_reduce` sums each group's
//                  partials in chunk order — a long group (routing is rarely even) does not
//                  leave one CTA walking thousands of rows while the others idle.
//
// project and expand take a table of row tiles (expert, first row, rows ≤ 64), outer one of
// row chunks (first row, rows ≤ 256, workspace slot) and its reduction one of groups (expert,
// first slot, slots); every sum runs in a fixed order (no atomics), so results repeat bit for
// bit. K and N are multiples of 8 and all buffers 16-byte aligned (the
// host checks): tiles move in 16-byte chunks. project's X and H and outer's R and X are rows
// laid `ld…` elements apart (a multiple of 8; the row length for a plain matrix): the expert
// adapters inside the base product's K keep x and its hidden in one buffer [M, K + r]
// (src/ops/lora_in_k.rs). Rows past a tile's or group's end read zeros and
// are not written. expand stages its tile in shared memory so Y is read and written in
// coalesced 16-byte chunks; its two roundings are those of a separate bf16 GEMM and add.
// Launch: project grid (tiles), expand grid (tiles, ⌈N/128⌉), outer grid (chunks, ⌈N/128⌉),
// reduce grid (⌈r·N/512⌉ capped, groups); 128 threads. CPU twin: src/ops/grouped_lora.rs (GroupedLora through `grouped_gemm`'s candle
// matmuls). Checked: src/gpu_check/ops/thin.rs (the "thin_gemm" entries) and through
// "grouped_lora" / "routed_experts" in bf16.
#include "common.cuh"

namespace {

constexpr int THREADS = 128;
constexpr int BM = 64;          // rows per tile (project, expand)
constexpr int BK = 64;          // reduction slice of project
constexpr int BN = 128;         // columns per CTA (expand, outer)
constexpr int OUTER_ROWS = 32;  // rows per step of outer
constexpr int PAD = 8;          // shared-memory row padding (bf16): conflict-free fragments

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8×8 bf16 matrices, transposed on load: lane l gives the address of row l % 8 of matrix
// l / 8, and receives (row 2·(l%4), col l/4) and (row 2·(l%4)+1, col l/4) of each.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* d, const bf16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(a));
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint4 zero4() { return make_uint4(0, 0, 0, 0); }

// Copies a [rows, cols] block (cols a multiple of 8, rows ≤ ROWS) of a row-major matrix with
// row length `ld` into shared memory [ROWS][SCOLS], zeros outside `valid_rows` × `valid_cols`.
template <int ROWS, int COLS, int SCOLS>
__device__ __forceinline__ void stage(bf16 (*dst)[SCOLS], const bf16* src, size_t ld, int valid_rows,
                                      int valid_cols) {
  for (int i = threadIdx.x; i < ROWS * COLS / 8; i += THREADS) {
    const int r = i / (COLS / 8), c = (i % (COLS / 8)) * 8;
    uint4 v = zero4();
    if (r < valid_rows && c < valid_cols) v = *reinterpret_cast<const uint4*>(src + (size_t)r * ld + c);
    *reinterpret_cast<uint4*>(&dst[r][c]) = v;
  }
}

template <int RP>
__device__ void project(const bf16* X, const bf16* W, const uint32_t* tiles, bf16* H, int K, int r,
                        float alpha, int ldx, int ldh) {
  __shared__ __align__(16) bf16 xs[BM][BK + PAD];
  __shared__ __align__(16) bf16 ws[RP][BK + PAD];
  const int e = tiles[3 * blockIdx.x], row0 = tiles[3 * blockIdx.x + 1], rows = tiles[3 * blockIdx.x + 2];
  const bf16* we = W + (size_t)e * r * K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const int m0 = warp * 16;
  float acc[RP / 8][4];
#pragma unroll
  for (int t = 0; t < RP / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += BK) {
    stage<BM, BK, BK + PAD>(xs, X + (size_t)row0 * ldx + k0, ldx, rows, K - k0);
    stage<RP, BK, BK + PAD>(ws, we + k0, K, r, K - k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      const uint32_t a[4] = {ld32(&xs[m0 + g][kk + 2 * c]), ld32(&xs[m0 + g + 8][kk + 2 * c]),
                             ld32(&xs[m0 + g][kk + 2 * c + 8]), ld32(&xs[m0 + g + 8][kk + 2 * c + 8])};
#pragma unroll
      for (int t = 0; t < RP / 8; ++t) {
        const uint32_t b[2] = {ld32(&ws[t * 8 + g][kk + 2 * c]), ld32(&ws[t * 8 + g][kk + 2 * c + 8])};
        mma(acc[t], a, b);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < RP / 8; ++t) {
    const int j = t * 8 + 2 * c;
    if (j >= r) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + g + 8 * half;
      if (row < rows) {
        __nv_bfloat162 v;
        v.x = __float2bfloat16_rn(alpha * acc[t][2 * half]);
        v.y = __float2bfloat16_rn(alpha * acc[t][2 * half + 1]);
        *reinterpret_cast<__nv_bfloat162*>(H + (size_t)(row0 + row) * ldh + j) = v;
      }
    }
  }
}

template <int RP, bool ACCUMULATE>
__device__ void expand(const bf16* Hm, const bf16* V, const uint32_t* tiles, bf16* Y, int N, int r,
                       float alpha) {
  __shared__ __align__(16) bf16 hs[BM][RP + PAD];
  __shared__ __align__(16) bf16 vs[BN][RP + PAD];
  __shared__ __align__(16) bf16 ys[BM][BN + PAD];
  const int e = tiles[3 * blockIdx.x], row0 = tiles[3 * blockIdx.x + 1], rows = tiles[3 * blockIdx.x + 2];
  const int n0 = blockIdx.y * BN;
  stage<BM, RP, RP + PAD>(hs, Hm + (size_t)row0 * r, r, rows, r);
  stage<BN, RP, RP + PAD>(vs, V + ((size_t)e * N + n0) * r, r, N - n0, r);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 64;
  float acc[2][8][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int t = 0; t < 8; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < RP; kk += 16) {
    uint32_t a[2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int rr = wm + m * 16 + g;
      a[m][0] = ld32(&hs[rr][kk + 2 * c]);
      a[m][1] = ld32(&hs[rr + 8][kk + 2 * c]);
      a[m][2] = ld32(&hs[rr][kk + 2 * c + 8]);
      a[m][3] = ld32(&hs[rr + 8][kk + 2 * c + 8]);
    }
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int n = wn + t * 8 + g;
      const uint32_t b[2] = {ld32(&vs[n][kk + 2 * c]), ld32(&vs[n][kk + 2 * c + 8])};
      mma(acc[0][t], a[0], b);
      mma(acc[1][t], a[1], b);
    }
  }
  // The update, rounded once, into the staging tile.
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        __nv_bfloat162 v;
        v.x = __float2bfloat16_rn(alpha * acc[m][t][2 * half]);
        v.y = __float2bfloat16_rn(alpha * acc[m][t][2 * half + 1]);
        *reinterpret_cast<__nv_bfloat162*>(&ys[wm + m * 16 + g + 8 * half][wn + t * 8 + 2 * c]) = v;
      }
  __syncthreads();
  for (int i = threadIdx.x; i < BM * BN / 8; i += THREADS) {
    const int rr = i / (BN / 8), cc = (i % (BN / 8)) * 8;
    if (rr >= rows || n0 + cc >= N) continue;
    uint4* dst = reinterpret_cast<uint4*>(Y + (size_t)(row0 + rr) * N + n0 + cc);
    uint4 d = *reinterpret_cast<const uint4*>(&ys[rr][cc]);
    if (ACCUMULATE) {
      uint4 y = *dst;
      bf16* yv = reinterpret_cast<bf16*>(&y);
      const bf16* dv = reinterpret_cast<const bf16*>(&d);
#pragma unroll
      for (int j = 0; j < 8; ++j) yv[j] = __float2bfloat16_rn(__bfloat162float(yv[j]) + __bfloat162float(dv[j]));
      d = y;
    }
    *dst = d;
  }
}

template <int RP>
__device__ void outer(const bf16* R, const bf16* X, const uint32_t* chunks, float* P, int r, int N, int ldr,
                      int ldx) {
  __shared__ __align__(16) bf16 rs[OUTER_ROWS][RP + PAD];  // [row][j]: A = Rᵀ, loaded transposed
  __shared__ __align__(16) bf16 xs[OUTER_ROWS][BN + PAD];  // [row][n]: B, loaded transposed
  const int first = chunks[3 * blockIdx.x], rows = chunks[3 * blockIdx.x + 1], slot = chunks[3 * blockIdx.x + 2];
  const int n0 = blockIdx.y * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const int q = lane >> 3, i8 = lane & 7;
  const int wn = warp * 32;  // this warp's 32 columns: 4 tiles of 8
  float acc[RP / 16][4][4];
#pragma unroll
  for (int m = 0; m < RP / 16; ++m)
#pragma unroll
    for (int t = 0; t < 4; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.0f;
  for (int t0 = 0; t0 < rows; t0 += OUTER_ROWS) {
    stage<OUTER_ROWS, RP, RP + PAD>(rs, R + (size_t)(first + t0) * ldr, ldr, rows - t0, r);
    stage<OUTER_ROWS, BN, BN + PAD>(xs, X + (size_t)(first + t0) * ldx + n0, ldx, rows - t0, N - n0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < OUTER_ROWS; kk += 16) {
      // B fragments of two column tiles per load: matrices (k 0-7, n 0-7), (k 8-15, n 0-7),
      // (k 0-7, n 8-15), (k 8-15, n 8-15).
      uint32_t b[4][2];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        uint32_t f[4];
        ldsm_x4_trans(f, &xs[kk + (q & 1) * 8 + i8][wn + p * 16 + (q >> 1) * 8]);
        b[2 * p][0] = f[0];
        b[2 * p][1] = f[1];
        b[2 * p + 1][0] = f[2];
        b[2 * p + 1][1] = f[3];
      }
#pragma unroll
      for (int m = 0; m < RP / 16; ++m) {
        // A = Rᵀ: matrices (j 0-7, k 0-7), (j 8-15, k 0-7), (j 0-7, k 8-15), (j 8-15, k 8-15),
        // each stored as rows of R (k) by columns (j).
        uint32_t a[4];
        ldsm_x4_trans(a, &rs[kk + (q >> 1) * 8 + i8][m * 16 + (q & 1) * 8]);
#pragma unroll
        for (int t = 0; t < 4; ++t) mma(acc[m][t], a, b[t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < RP / 16; ++m)
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int n = n0 + wn + t * 8 + 2 * c;
      if (n >= N) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int j = m * 16 + g + 8 * half;
        if (j >= r) continue;
        *reinterpret_cast<float2*>(P + ((size_t)slot * r + j) * N + n) =
            make_float2(acc[m][t][2 * half], acc[m][t][2 * half + 1]);
      }
    }
}

// D[e] = T(α · Σ_s P[s]) over a group's chunk partials s = first..first+count, in order.
__device__ void outer_reduce(const float* P, const uint32_t* groups, bf16* D, int r, int N, float alpha) {
  const size_t e = groups[3 * blockIdx.y], s0 = groups[3 * blockIdx.y + 1], count = groups[3 * blockIdx.y + 2];
  const size_t len = (size_t)r * N;
  for (size_t i = (blockIdx.x * (size_t)THREADS + threadIdx.x) * 4; i < len; i += (size_t)gridDim.x * THREADS * 4) {
    float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (size_t k = 0; k < count; ++k) {
      const float4 v = *reinterpret_cast<const float4*>(P + (s0 + k) * len + i);
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    __nv_bfloat162 lo, hi;
    lo.x = __float2bfloat16_rn(alpha * s.x);
    lo.y = __float2bfloat16_rn(alpha * s.y);
    hi.x = __float2bfloat16_rn(alpha * s.z);
    hi.y = __float2bfloat16_rn(alpha * s.w);
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(D + e * len + i);
    d[0] = lo;
    d[1] = hi;
  }
}

}  // namespace

#define THIN_KERNELS(RP)                                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS) lora_project_r##RP(                                 \
      const bf16* X, const bf16* W, const uint32_t* tiles, bf16* H, int K, int r, float alpha, int ldx,     \
      int ldh) {                                                                                            \
    project<RP>(X, W, tiles, H, K, r, alpha, ldx, ldh);                                                     \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS) lora_expand_r##RP(                                  \
      const bf16* Hm, const bf16* V, const uint32_t* tiles, bf16* Y, int N, int r, float alpha) {           \
    expand<RP, false>(Hm, V, tiles, Y, N, r, alpha);                                                        \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS) lora_expand_add_r##RP(                              \
      const bf16* Hm, const bf16* V, const uint32_t* tiles, bf16* Y, int N, int r, float alpha) {           \
    expand<RP, true>(Hm, V, tiles, Y, N, r, alpha);                                                         \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS) lora_outer_mma_r##RP(                               \
      const bf16* R, const bf16* X, const uint32_t* chunks, float* P, int r, int N, int ldr, int ldx) {     \
    outer<RP>(R, X, chunks, P, r, N, ldr, ldx);                                                             \
  }
extern "C" __global__ void __launch_bounds__(THREADS)
    lora_outer_reduce(const float* P, const uint32_t* groups, bf16* D, int r, int N, float alpha) {
  outer_reduce(P, groups, D, r, N, alpha);
}
THIN_KERNELS(16)
THIN_KERNELS(32)
THIN_KERNELS(64)
