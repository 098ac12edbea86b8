// SwiGLU forward: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
// Layout: gate, up, out contiguous with n elements each; computed in f32, one rounding to T.
// Launch: 1-D grid-stride loop, any grid size. CPU twin: src/ops/swiglu/mod.rs (SwiGlu::cpu_fwd,
// i.e. silu_mul; primitive-op reference swiglu_reference). Checked: src/gpu_check/ops/mod.rs
// (check_swiglu: the "swiglu" entries, forward, d_gate and d_up).
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* out, const size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float g = to_f32(gate[i]);
    const float u = to_f32(up[i]);
    out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
  }
}

extern "C" __global__ void swiglu_fwd_f32(const float* g, const float* u, float* o, const size_t n) {
  swiglu_fwd(g, u, o, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* o,
                                           const size_t n) {
  swiglu_fwd(g, u, o, n);
}
extern "C" __global__ void swiglu_fwd_f16(const __half* g, const __half* u, __half* o, const size_t n) {
  swiglu_fwd(g, u, o, n);
}

// Packed SwiGLU over the fused gate_up projection: gu [rows, 2·half] holds gate in columns
// [0, half) and up in [half, 2·half); out [rows, half] = silu(gate) · up.
// Backward: dgu = [dy·up·σ(g)·(1 + g·(1 − σ(g))), dy·silu(g)] in the same packed layout.
// CPU twin: src/ops/swiglu/mod.rs (packed_cpu, forward and with dy backward).
// Checked: src/gpu_check/ops/mod.rs (the "swiglu_packed" entries) and "routed experts".
template <typename T>
__device__ void swiglu_packed_fwd(const T* gu, T* out, const size_t rows, const size_t half) {
  const size_t n = rows * half;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / half, c = i % half;
    const float g = to_f32(gu[r * 2 * half + c]);
    const float u = to_f32(gu[r * 2 * half + half + c]);
    out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
  }
}

template <typename T>
__device__ void swiglu_packed_bwd(const T* gu, const T* dy, T* dgu, const size_t rows, const size_t half) {
  const size_t n = rows * half;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / half, c = i % half;
    const float g = to_f32(gu[r * 2 * half + c]);
    const float u = to_f32(gu[r * 2 * half + half + c]);
    const float d = to_f32(dy[i]);
    const float sig = 1.0f / (1.0f + expf(-g));
    dgu[r * 2 * half + c] = from_f32<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
    dgu[r * 2 * half + half + c] = from_f32<T>(d * g * sig);
  }
}

// The same over 16-byte packs of VEC = 16 / sizeof(T) columns per thread (half % VEC == 0 and
// gu, dy 16-byte aligned: the caller checks): one index division per pack, vector loads. The
// forward's output rows lie `ldo` apart (half, or wider: down's expert adapter then takes the
// columns past half, src/ops/lora_in_k.rs; a multiple of VEC).
template <typename T>
__device__ void swiglu_packed_fwd_vec(const T* gu, T* out, const size_t rows, const size_t half, const size_t ldo) {
  constexpr int VEC = 16 / sizeof(T);
  const size_t per_row = half / VEC, n = rows * per_row;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / per_row, c = (i % per_row) * VEC;
    Pack<T> g, u, o;
    g.v = *reinterpret_cast<const uint4*>(gu + r * 2 * half + c);
    u.v = *reinterpret_cast<const uint4*>(gu + r * 2 * half + half + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float x = to_f32(g.e[j]);
      o.e[j] = from_f32<T>(x / (1.0f + expf(-x)) * to_f32(u.e[j]));
    }
    *reinterpret_cast<uint4*>(out + r * ldo + c) = o.v;
  }
}

// One 16-byte pack of the backward: row r, columns c … c + VEC − 1 of dy (c of gate, half + c of
// up in gu; dgu's rows lie `ldg` apart: 2·half, or wider — gate_up's expert adapter then takes
// the columns past 2·half, src/ops/lora_in_k.rs). With DOT it returns the pack's share of Σ dy · T(silu(g) · u), the activation
// rounded as the forward stored it (swiglu_packed_fwd's formula); else 0.
template <typename T, bool DOT>
__device__ __forceinline__ float swiglu_packed_bwd_pack(const T* gu, const T* dy, T* dgu, const size_t r,
                                                        const size_t c, const size_t half, const size_t ldg) {
  constexpr int VEC = 16 / sizeof(T);
  Pack<T> g, u, d, dg, du;
  g.v = *reinterpret_cast<const uint4*>(gu + r * 2 * half + c);
  u.v = *reinterpret_cast<const uint4*>(gu + r * 2 * half + half + c);
  d.v = *reinterpret_cast<const uint4*>(dy + r * half + c);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float x = to_f32(g.e[j]), up = to_f32(u.e[j]), dd = to_f32(d.e[j]);
    const float sig = 1.0f / (1.0f + expf(-x));
    dg.e[j] = from_f32<T>(dd * up * sig * (1.0f + x * (1.0f - sig)));
    du.e[j] = from_f32<T>(dd * x * sig);
    if (DOT) sum += dd * to_f32(from_f32<T>(x / (1.0f + expf(-x)) * up));
  }
  *reinterpret_cast<uint4*>(dgu + r * ldg + c) = dg.v;
  *reinterpret_cast<uint4*>(dgu + r * ldg + half + c) = du.v;
  return sum;
}

template <typename T>
__device__ void swiglu_packed_bwd_vec(const T* gu, const T* dy, T* dgu, const size_t rows, const size_t half,
                                      const size_t ldg) {
  constexpr int VEC = 16 / sizeof(T);
  const size_t per_row = half / VEC, n = rows * per_row;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    swiglu_packed_bwd_pack<T, false>(gu, dy, dgu, i / per_row, (i % per_row) * VEC, half, ldg);
  }
}

// swiglu_packed_bwd_vec's arithmetic, one warp per row (16-byte packs, the same conditions),
// also writing the row's dot product of dy with the activation as the forward stored it,
// dot[r] = Σ_c dy[r, c] · T(silu(g) · u) in f32: for a routed row whose output a routing weight
// w scaled, w times that weight's gradient less the bias's part (src/ops/held_experts.rs).
// Lanes take packs lane, lane + 32, …; their sums are added by the warp's butterfly (no
// atomics: the same sum every run). Launch: blocks of 256 threads (8 rows), any number of
// blocks. CPU twin: src/ops/swiglu/mod.rs (packed_backward_dot_reference). Checked:
// src/gpu_check/ops/dots.rs (the "swiglu_packed dot" entries).
template <typename T>
__device__ void swiglu_packed_bwd_dot_vec(const T* gu, const T* dy, T* dgu, float* dot, const size_t rows,
                                          const size_t half, const size_t ldg) {
  constexpr int VEC = 16 / sizeof(T);
  const size_t per_row = half / VEC;
  const int lane = threadIdx.x % 32;
  for (size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; r < rows;
       r += (size_t)gridDim.x * blockDim.x / 32) {
    float sum = 0.0f;
    for (size_t p = lane; p < per_row; p += 32) {
      sum += swiglu_packed_bwd_pack<T, true>(gu, dy, dgu, r, p * VEC, half, ldg);
    }
    sum = warp_reduce<false>(sum);
    if (lane == 0) dot[r] = sum;
  }
}

#define PACKED(T, SUFFIX)                                                                             \
  extern "C" __global__ void swiglu_packed_fwd_##SUFFIX(const T* gu, T* out, const size_t rows,      \
                                                        const size_t half) {                         \
    swiglu_packed_fwd(gu, out, rows, half);                                                         \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_bwd_##SUFFIX(const T* gu, const T* dy, T* dgu,            \
                                                        const size_t rows, const size_t half) {      \
    swiglu_packed_bwd(gu, dy, dgu, rows, half);                                                     \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_fwd_vec_##SUFFIX(const T* gu, T* out, const size_t rows,  \
                                                            const size_t half) {                     \
    swiglu_packed_fwd_vec(gu, out, rows, half, half);                                               \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_fwd_wide_vec_##SUFFIX(const T* gu, T* out,                \
                                                                 const size_t rows, const size_t half, \
                                                                 const size_t ldo) {                 \
    swiglu_packed_fwd_vec(gu, out, rows, half, ldo);                                                \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_bwd_vec_##SUFFIX(const T* gu, const T* dy, T* dgu,        \
                                                            const size_t rows, const size_t half) {  \
    swiglu_packed_bwd_vec(gu, dy, dgu, rows, half, 2 * half);                                       \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_bwd_wide_vec_##SUFFIX(const T* gu, const T* dy, T* dgu,   \
                                                                 const size_t rows, const size_t half, \
                                                                 const size_t ldg) {                 \
    swiglu_packed_bwd_vec(gu, dy, dgu, rows, half, ldg);                                            \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_bwd_dot_vec_##SUFFIX(const T* gu, const T* dy, T* dgu,    \
                                                                float* dot, const size_t rows,       \
                                                                const size_t half) {                 \
    swiglu_packed_bwd_dot_vec(gu, dy, dgu, dot, rows, half, 2 * half);                              \
  }                                                                                                   \
  extern "C" __global__ void swiglu_packed_bwd_dot_wide_vec_##SUFFIX(                                \
      const T* gu, const T* dy, T* dgu, float* dot, const size_t rows, const size_t half,           \
      const size_t ldg) {                                                                             \
    swiglu_packed_bwd_dot_vec(gu, dy, dgu, dot, rows, half, ldg);                                   \
  }

PACKED(float, f32)
PACKED(__nv_bfloat16, bf16)
PACKED(__half, f16)

// gpt-oss's clamped GLU over a fused gate_up row of interleaved pairs: gate in column 2c, up in
// 2c + 1; g = min(gate, limit), u = clamp(up, -limit, limit), out[c] = g·σ(alpha·g)·(u + 1).
// Backward: d gate = dy·(u + 1)·σ·(1 + alpha·g·(1 − σ)) where gate ≤ limit (else 0), d up =
// dy·g·σ where |up| ≤ limit (else 0), in the same interleaved layout.
// CPU twin: src/ops/swiglu/mod.rs (packed_cpu with Glu::Clamped; primitive-op reference
// clamped_glu_reference). Checked: src/gpu_check/ops/mod.rs (the "clamped_glu" entries).
template <typename T>
__device__ void clamped_glu_fwd(const T* gu, T* out, const size_t rows, const size_t half, const float alpha,
                                const float limit) {
  const size_t n = rows * half;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float g = fminf(to_f32(gu[2 * i]), limit);
    const float u = fminf(fmaxf(to_f32(gu[2 * i + 1]), -limit), limit);
    out[i] = from_f32<T>(g / (1.0f + expf(-alpha * g)) * (u + 1.0f));
  }
}

template <typename T>
__device__ void clamped_glu_bwd(const T* gu, const T* dy, T* dgu, const size_t rows, const size_t half,
                                const float alpha, const float limit) {
  const size_t n = rows * half;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float graw = to_f32(gu[2 * i]), uraw = to_f32(gu[2 * i + 1]), d = to_f32(dy[i]);
    const float g = fminf(graw, limit);
    const float u = fminf(fmaxf(uraw, -limit), limit);
    const float sig = 1.0f / (1.0f + expf(-alpha * g));
    const float dg = graw <= limit ? d * (u + 1.0f) * sig * (1.0f + alpha * g * (1.0f - sig)) : 0.0f;
    const float du = fabsf(uraw) <= limit ? d * g * sig : 0.0f;
    dgu[2 * i] = from_f32<T>(dg);
    dgu[2 * i + 1] = from_f32<T>(du);
  }
}

#define CLAMPED(T, SUFFIX)                                                                              \
  extern "C" __global__ void clamped_glu_fwd_##SUFFIX(const T* gu, T* out, const size_t rows,          \
                                                      const size_t half, const float alpha,             \
                                                      const float limit) {                              \
    clamped_glu_fwd(gu, out, rows, half, alpha, limit);                                                 \
  }                                                                                                     \
  extern "C" __global__ void clamped_glu_bwd_##SUFFIX(const T* gu, const T* dy, T* dgu, const size_t rows, \
                                                      const size_t half, const float alpha,             \
                                                      const float limit) {                              \
    clamped_glu_bwd(gu, dy, dgu, rows, half, alpha, limit);                                             \
  }

CLAMPED(float, f32)
CLAMPED(__nv_bfloat16, bf16)
CLAMPED(__half, f16)
