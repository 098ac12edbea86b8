// The per-head RMSNorm of q or k (optional) and the rotary embedding in one pass, one warp per
// row (token, head) of D = 32·C elements (C = 2, 4, 8: heads of 64, 128, 256); x [N, H, D],
// w [D], cos/sin [N, D]. Lane l holds elements l·C .. l·C + C − 1 (one load of C elements), so
// element i of the first half and i + D/2 sit in lanes l and l + 16, same slot: the rotation's
// partner is one shuffle away. The arithmetic is rms_norm_fwd_warp's then rope_fwd's, with the
// same roundings to T in between (the norm's output, then the rotation's), and the norm's sums
// are added in the warp kernels' order (block_order_sum: element c = lane + 32·w summed over
// lanes per w, then the per-w sums), read back through shared memory:
//   forward:   z = norm(x) (or x);           y = rope(z)
//   backward:  dz = rope_bwd(dy), rounded;   dx = norm_bwd(x, dz) (or dz)
// Launch: grid ceil(N·H / 8), block 256 (8 rows). CPU twin: src/ops/norm_rope.rs (the separate
// ops: ops::norm's and ops::rope's CPU paths). Checked: src/gpu_check/ops/mod.rs (the
// "norm_rope" entries) and src/gpu_check/ops/attention.rs ("attention_block").
#include "common.cuh"

constexpr int ROWS = 8;

// C elements of T from p (C·sizeof(T) bytes, aligned to that size) as f32, and back.
template <typename T, int C>
__device__ __forceinline__ void load(const T* p, float (&v)[C]) {
  constexpr int B = C * sizeof(T);
  if constexpr (B >= 16) {
#pragma unroll
    for (int q = 0; q < B / 16; ++q) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[q];
      const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 16 / (int)sizeof(T); ++e) v[q * (16 / sizeof(T)) + e] = to_f32(t[e]);
    }
  } else if constexpr (B == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < C; ++e) v[e] = to_f32(t[e]);
  } else {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(p);
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < C; ++e) v[e] = to_f32(t[e]);
  }
}

template <typename T, int C>
__device__ __forceinline__ void store(T* p, const float (&v)[C]) {
  constexpr int B = C * sizeof(T);
  if constexpr (B >= 16) {
#pragma unroll
    for (int q = 0; q < B / 16; ++q) {
      uint4 raw;
      T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int e = 0; e < 16 / (int)sizeof(T); ++e) t[e] = from_f32<T>(v[q * (16 / sizeof(T)) + e]);
      reinterpret_cast<uint4*>(p)[q] = raw;
    }
  } else if constexpr (B == 8) {
    uint2 raw;
    T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int e = 0; e < C; ++e) t[e] = from_f32<T>(v[e]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
    uint32_t raw;
    T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int e = 0; e < C; ++e) t[e] = from_f32<T>(v[e]);
    *reinterpret_cast<uint32_t*>(p) = raw;
  }
}

// Σ over the row of the lanes' terms t[0..C) in block_order_sum's order (kernels/rms_norm.cu):
// element c = lane + 32·w is term c % C of lane c / C. `row` is this warp's D floats of shared
// memory.
template <int C>
__device__ __forceinline__ float row_sum(const float (&t)[C], float* row) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < C; ++e) row[lane * C + e] = t[e];
  __syncwarp();
  float v = 0.0f;
#pragma unroll
  for (int w = 0; w < C; ++w) {
    const float part = warp_reduce<false>(row[lane + 32 * w]);
    if (lane == w) v = part;
  }
  __syncwarp();  // the row is rewritten by the next sum
  return warp_reduce<false>(v);
}

template <typename T, int C>
__device__ void norm_rope_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ cos,
                              const T* __restrict__ sin, T* __restrict__ y, const uint32_t rows, const uint32_t heads,
                              const float eps) {
  constexpr int D = 32 * C;
  __shared__ float shared[ROWS][D];
  const uint32_t row = blockIdx.x * ROWS + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const size_t at = (size_t)row * D + lane * C;
  const size_t table = (size_t)(row / heads) * D + lane * C;
  float z[C];
  load<T, C>(x + at, z);
  if (w != nullptr) {
    float sq[C], wv[C];
#pragma unroll
    for (int e = 0; e < C; ++e) sq[e] = z[e] * z[e];
    const float r = rsqrtf(row_sum<C>(sq, shared[threadIdx.x / 32]) / D + eps);
    load<T, C>(w + lane * C, wv);
#pragma unroll
    for (int e = 0; e < C; ++e) {
      const float n = to_f32(from_f32<T>(z[e] * r));
      z[e] = to_f32(from_f32<T>(n * wv[e]));
    }
  }
  float c[C], s[C], out[C];
  load<T, C>(cos + table, c);
  load<T, C>(sin + table, s);
  const bool low = lane < 16;
#pragma unroll
  for (int e = 0; e < C; ++e) {
    const float other = __shfl_xor_sync(0xffffffff, z[e], 16);
    // rope_fwd: y[i] = a·cos[i] − b·sin[i], y[i + half] = b·cos[i + half] + a·sin[i + half].
    out[e] = low ? z[e] * c[e] - other * s[e] : z[e] * c[e] + other * s[e];
  }
  store<T, C>(y + at, out);
}

template <typename T, int C>
__device__ void norm_rope_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ cos,
                              const T* __restrict__ sin, const T* __restrict__ dy, T* __restrict__ dx,
                              const uint32_t rows, const uint32_t heads, const float eps) {
  constexpr int D = 32 * C;
  __shared__ float shared[ROWS][D];
  const uint32_t row = blockIdx.x * ROWS + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const size_t at = (size_t)row * D + lane * C;
  const size_t table = (size_t)(row / heads) * D + lane * C;
  float g[C], c[C], s[C], dz[C];
  load<T, C>(dy + at, g);
  load<T, C>(cos + table, c);
  load<T, C>(sin + table, s);
  const bool low = lane < 16;
#pragma unroll
  for (int e = 0; e < C; ++e) {
    const float other = __shfl_xor_sync(0xffffffff, g[e], 16);
    const float other_sin = __shfl_xor_sync(0xffffffff, s[e], 16);
    // rope_bwd: dx[i] = dy[i]·cos[i] + dy[i + half]·sin[i + half],
    //           dx[i + half] = dy[i + half]·cos[i + half] − dy[i]·sin[i]; rounded to T.
    dz[e] = to_f32(from_f32<T>(low ? g[e] * c[e] + other * other_sin : g[e] * c[e] - other * other_sin));
  }
  if (w != nullptr) {
    float xv[C], wv[C], t[C];
    load<T, C>(x + at, xv);
    load<T, C>(w + lane * C, wv);
    float* row_mem = shared[threadIdx.x / 32];
#pragma unroll
    for (int e = 0; e < C; ++e) t[e] = xv[e] * xv[e];
    const float r = rsqrtf(row_sum<C>(t, row_mem) / D + eps);
#pragma unroll
    for (int e = 0; e < C; ++e) t[e] = dz[e] * wv[e] * xv[e] * r;
    const float mean_gn = row_sum<C>(t, row_mem) / D;
#pragma unroll
    for (int e = 0; e < C; ++e) {
      const float n = xv[e] * r;
      dz[e] = r * (dz[e] * wv[e] - n * mean_gn);
    }
  }
  store<T, C>(dx + at, dz);
}

#define NORM_ROPE(T, SUFFIX, C)                                                                          \
  extern "C" __global__ void norm_rope_fwd_##C##_##SUFFIX(const T* x, const T* w, const T* cos, const T* sin, \
                                                          T* y, const uint32_t rows, const uint32_t heads, \
                                                          const float eps) {                             \
    norm_rope_fwd<T, C>(x, w, cos, sin, y, rows, heads, eps);                                            \
  }                                                                                                      \
  extern "C" __global__ void norm_rope_bwd_##C##_##SUFFIX(const T* x, const T* w, const T* cos, const T* sin, \
                                                          const T* dy, T* dx, const uint32_t rows,       \
                                                          const uint32_t heads, const float eps) {       \
    norm_rope_bwd<T, C>(x, w, cos, sin, dy, dx, rows, heads, eps);                                       \
  }

#define NORM_ROPE_SIZES(T, SUFFIX) NORM_ROPE(T, SUFFIX, 2) NORM_ROPE(T, SUFFIX, 4) NORM_ROPE(T, SUFFIX, 8)

NORM_ROPE_SIZES(float, f32)
NORM_ROPE_SIZES(__nv_bfloat16, bf16)
NORM_ROPE_SIZES(__half, f16)
