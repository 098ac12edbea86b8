// RMSNorm as transformers computes it, one block per row of x [rows, d] (rows of up to 1,024:
// one warp per row, 8 rows per block, same sums in the same order — the per-head q/k norms
// have rows of 128; longer rows whose 16-byte packs fit NP per lane: one warp per row, the row
// held in registers, loaded once — the _vec kernels, sums in another order):
//   r = rsqrt(mean(x²) + eps);  n = x·r (f32) rounded to T;  y = n · w, rounded to T.
// Backward (the weight is frozen: only dx):  g = dy·w;  dx = r · (g − n · mean(g·n))  (f32).
// CPU twin: src/ops/norm.rs (rms_norm_reference, rms_norm_bwd_ops).
// Checked: src/gpu_check/ops/mod.rs (the "rms_norm" entries) and src/gpu_check/ops/attention.rs
// ("attention_block": the per-head norms).
#include "common.cuh"

constexpr int THREADS = 256;

__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < THREADS / 32 ? shared[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, const size_t d, const float eps) {
  __shared__ float shared[THREADS / 32];
  const T* xr = x + blockIdx.x * d;
  T* yr = y + blockIdx.x * d;
  float ss = 0.0f;
  for (size_t c = threadIdx.x; c < d; c += THREADS) {
    const float v = to_f32(xr[c]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss, shared) / d + eps);
  for (size_t c = threadIdx.x; c < d; c += THREADS) {
    const float n = to_f32(from_f32<T>(to_f32(xr[c]) * r));
    yr[c] = from_f32<T>(n * to_f32(w[c]));
  }
}

template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* dy, T* dx, const size_t d, const float eps) {
  __shared__ float shared[THREADS / 32];
  const size_t off = blockIdx.x * d;
  float ss = 0.0f, gn = 0.0f;
  for (size_t c = threadIdx.x; c < d; c += THREADS) {
    const float v = to_f32(x[off + c]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss, shared) / d + eps);
  for (size_t c = threadIdx.x; c < d; c += THREADS) {
    gn += to_f32(dy[off + c]) * to_f32(w[c]) * to_f32(x[off + c]) * r;
  }
  const float mean_gn = block_sum(gn, shared) / d;
  for (size_t c = threadIdx.x; c < d; c += THREADS) {
    const float n = to_f32(x[off + c]) * r;
    dx[off + c] = from_f32<T>(r * (to_f32(dy[off + c]) * to_f32(w[c]) - n * mean_gn));
  }
}

constexpr int ROWS_PER_BLOCK = THREADS / 32;

// Σ term(c) over c < d by one warp, added in exactly the order block_sum adds them (thread t of
// THREADS sums c = t, t + THREADS, ...; each warp's 32 partials are reduced; warp 0 reduces the
// THREADS / 32 warp sums), so the warp kernels give the block kernels' results bit for bit.
template <typename F>
__device__ float block_order_sum(const F& term, const int d) {
  const int lane = threadIdx.x % 32;
  float v = 0.0f;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) {
    float part = 0.0f;
    for (int c = lane + 32 * w; c < d; c += THREADS) part += term(c);
    part = warp_reduce<false>(part);
    if (lane == w) v = part;
  }
  return warp_reduce<false>(v);
}

template <typename T>
__device__ void rms_norm_fwd_warp(const T* x, const T* w, T* y, const size_t rows, const int d, const float eps) {
  const size_t row = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  const float ss = block_order_sum([&](int c) { const float v = to_f32(xr[c]); return v * v; }, d);
  const float r = rsqrtf(ss / d + eps);
  for (int c = lane; c < d; c += 32) {
    const float n = to_f32(from_f32<T>(to_f32(xr[c]) * r));
    yr[c] = from_f32<T>(n * to_f32(w[c]));
  }
}

template <typename T>
__device__ void rms_norm_bwd_warp(const T* x, const T* w, const T* dy, T* dx, const size_t rows, const int d,
                                  const float eps) {
  const size_t row = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const size_t off = row * d;
  const float ss = block_order_sum([&](int c) { const float v = to_f32(x[off + c]); return v * v; }, d);
  const float r = rsqrtf(ss / d + eps);
  const float mean_gn =
      block_order_sum([&](int c) { return to_f32(dy[off + c]) * to_f32(w[c]) * to_f32(x[off + c]) * r; }, d) / d;
  for (int c = lane; c < d; c += 32) {
    const float n = to_f32(x[off + c]) * r;
    dx[off + c] = from_f32<T>(r * (to_f32(dy[off + c]) * to_f32(w[c]) - n * mean_gn));
  }
}

// The _vec kernels: one warp per row of d = packs · P elements (P = 16 / sizeof(T)), lane l
// holding packs l, l + 32, ... (at most NP: packs ≤ 32 · NP), rows 16-byte aligned. The row is
// read once (the backward: x and dy once, the weight row twice from cache); the same formulas
// as above, each lane's terms summed pack by pack, then across the warp.
// rsqrt(mean(x²) + eps) of the row whose packs lane, lane + 32, ... (< packs) this lane holds.
template <typename T, int NP>
__device__ __forceinline__ float row_rsqrt(const Pack<T> (&xv)[NP], const int lane, const int packs, const int d,
                                           const float eps) {
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    if (lane + 32 * j < packs) {
#pragma unroll
      for (int e = 0; e < 16 / (int)sizeof(T); ++e) {
        const float v = to_f32(xv[j].e[e]);
        ss += v * v;
      }
    }
  }
  return rsqrtf(warp_reduce<false>(ss) / d + eps);
}

// y's rows are laid ld apart (ld = d, or wider rows whose last columns the caller fills).
template <typename T, int NP>
__device__ void rms_norm_fwd_vec(const T* x, const T* w, T* y, const size_t rows, const int d, const size_t ld,
                                 const float eps) {
  constexpr int P = 16 / sizeof(T);
  const size_t row = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, packs = d / P;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * d);
  const uint4* wr = reinterpret_cast<const uint4*>(w);
  uint4* yr = reinterpret_cast<uint4*>(y + row * ld);
  Pack<T> xv[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    if (lane + 32 * j < packs) xv[j].v = xr[lane + 32 * j];
  }
  const float r = row_rsqrt<T, NP>(xv, lane, packs, d, eps);
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int p = lane + 32 * j;
    if (p < packs) {
      Pack<T> wv, o;
      wv.v = wr[p];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float n = to_f32(from_f32<T>(to_f32(xv[j].e[e]) * r));
        o.e[e] = from_f32<T>(n * to_f32(wv.e[e]));
      }
      yr[p] = o.v;
    }
  }
}

// PLUS (rms_norm_bwd_plus_vec8): dx = plus + (the norm's dx rounded to T), T's own addition —
// the pre-norm residual's input gradient in the same pass, the values of a separate add.
// add_rn: that addition, never contracted with the product before it into an fma (f32).
__device__ __forceinline__ float add_rn(const float a, const float b) { return __fadd_rn(a, b); }
template <typename T>
__device__ __forceinline__ T add_rn(const T a, const T b) { return a + b; }

template <typename T, int NP, bool PLUS>
__device__ void rms_norm_bwd_vec(const T* x, const T* w, const T* dy, const T* plus, T* dx, const size_t rows,
                                 const int d, const float eps) {
  constexpr int P = 16 / sizeof(T);
  const size_t row = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, packs = d / P;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * d);
  const uint4* dyr = reinterpret_cast<const uint4*>(dy + row * d);
  const uint4* wr = reinterpret_cast<const uint4*>(w);
  uint4* dxr = reinterpret_cast<uint4*>(dx + row * d);
  Pack<T> xv[NP], gv[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    if (lane + 32 * j < packs) {
      xv[j].v = xr[lane + 32 * j];
      gv[j].v = dyr[lane + 32 * j];
    }
  }
  const float r = row_rsqrt<T, NP>(xv, lane, packs, d, eps);
  float gn = 0.0f;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int p = lane + 32 * j;
    if (p < packs) {
      Pack<T> wv;
      wv.v = wr[p];
#pragma unroll
      for (int e = 0; e < P; ++e) gn += to_f32(gv[j].e[e]) * to_f32(wv.e[e]) * to_f32(xv[j].e[e]) * r;
    }
  }
  const float mean_gn = warp_reduce<false>(gn) / d;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int p = lane + 32 * j;
    if (p < packs) {
      Pack<T> wv, o, pv;
      wv.v = wr[p];
      if (PLUS) pv.v = reinterpret_cast<const uint4*>(plus + row * d)[p];
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float n = to_f32(xv[j].e[e]) * r;
        o.e[e] = from_f32<T>(r * (to_f32(gv[j].e[e]) * to_f32(wv.e[e]) - n * mean_gn));
        if (PLUS) o.e[e] = add_rn(pv.e[e], o.e[e]);
      }
      dxr[p] = o.v;
    }
  }
}

#define RMS_VEC_FWD(T, SUFFIX, NP)                                                                   \
  extern "C" __global__ void rms_norm_fwd_vec##NP##_##SUFFIX(const T* x, const T* w, T* y, const size_t rows, \
                                                             const int d, const float eps) {          \
    rms_norm_fwd_vec<T, NP>(x, w, y, rows, d, d, eps);                                             \
  }                                                                                                  \
  extern "C" __global__ void rms_norm_fwd_wide_vec##NP##_##SUFFIX(const T* x, const T* w, T* y,     \
                                                                  const size_t rows, const int d,   \
                                                                  const size_t ld, const float eps) { \
    rms_norm_fwd_vec<T, NP>(x, w, y, rows, d, ld, eps);                                            \
  }
#define RMS_VEC_BWD(T, SUFFIX, NP)                                                                   \
  extern "C" __global__ void rms_norm_bwd_vec##NP##_##SUFFIX(const T* x, const T* w, const T* dy, T* dx, \
                                                             const size_t rows, const int d, const float eps) { \
    rms_norm_bwd_vec<T, NP, false>(x, w, dy, nullptr, dx, rows, d, eps);                           \
  }                                                                                                  \
  extern "C" __global__ void rms_norm_bwd_plus_vec##NP##_##SUFFIX(const T* x, const T* w, const T* dy, \
                                                                  const T* plus, T* dx, const size_t rows, \
                                                                  const int d, const float eps) {     \
    rms_norm_bwd_vec<T, NP, true>(x, w, dy, plus, dx, rows, d, eps);                               \
  }

#define RMS_KERNELS(T, SUFFIX)                                                                       \
  extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, const size_t d,    \
                                                   const float eps) {                               \
    rms_norm_fwd(x, w, y, d, eps);                                                                 \
  }                                                                                                  \
  extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* dy, T* dx,      \
                                                   const size_t d, const float eps) {               \
    rms_norm_bwd(x, w, dy, dx, d, eps);                                                            \
  }                                                                                                  \
  extern "C" __global__ void rms_norm_fwd_warp_##SUFFIX(const T* x, const T* w, T* y, const size_t rows, \
                                                        const int d, const float eps) {             \
    rms_norm_fwd_warp(x, w, y, rows, d, eps);                                                      \
  }                                                                                                  \
  extern "C" __global__ void rms_norm_bwd_warp_##SUFFIX(const T* x, const T* w, const T* dy, T* dx, \
                                                        const size_t rows, const int d, const float eps) { \
    rms_norm_bwd_warp(x, w, dy, dx, rows, d, eps);                                                 \
  }                                                                                                  \
  RMS_VEC_FWD(T, SUFFIX, 8)                                                                          \
  RMS_VEC_FWD(T, SUFFIX, 16)                                                                         \
  RMS_VEC_BWD(T, SUFFIX, 8)

RMS_KERNELS(float, f32)
RMS_KERNELS(__nv_bfloat16, bf16)
RMS_KERNELS(__half, f16)
