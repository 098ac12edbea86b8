// Blockwise 4-bit (NF4 / FP4) quantization and dequantization, bit-exact with bitsandbytes'
// CUDA kernels (kQuantizeBlockwise, kDequantizeBlockwise, built with --use_fast_math).
// CPU twin: src/quant/blockwise.rs (quantize_4bit, dequantize_4bit); dequantize_absmax:
// src/quant/nested.rs (dequantize_absmax, dequantize_absmax_range). Golden data:
// tests/fixtures/nf4/. Checked: src/gpu_check/quant.rs (the "nf4-kernels" entries, byte for byte).
//
// Layout: x is the row-major flattened tensor of n elements; block b = [b*bs, (b+1)*bs);
// packed[j] = code(x[2j]) << 4 | code(x[2j+1]) (odd tail: low nibble codes 0.0); absmax[b] f32.
//
// Quantize launch: 1-D grid-stride over quantization blocks. A group of G = min(32, bs/2)
// lanes owns one block (32/G blocks per warp): each lane loads a pair of elements per step,
// the group reduces max|x| with shuffles, then each lane writes its bytes. One read of x and
// one write of the codes: the kernel is bound by memory bandwidth.
//
// Arithmetic matches the reference exactly: scale = rcp.approx.ftz(absmax) and
// x * scale with mul.ftz (what nvcc emits for bitsandbytes' `1.0f / absmax` and `x * scale`
// under --use_fast_math), spelled out in PTX so this file does not depend on build flags.
#include "common.cuh"

__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ unsigned char quantize_nf4(float x) {
  if (x > 0.03979014977812767f)
    if (x > 0.3893125355243683f)
      if (x > 0.6427869200706482f)
        return x > 0.8614784181118011f ? 0b1111 : 0b1110;
      else
        return x > 0.5016634166240692f ? 0b1101 : 0b1100;
    else if (x > 0.2035212516784668f)
      return x > 0.2920137718319893f ? 0b1011 : 0b1010;
    else
      return x > 0.1202552504837513f ? 0b1001 : 0b1000;
  else if (x > -0.33967943489551544f)
    if (x > -0.13791173323988914f)
      return x > -0.045525018125772476f ? 0b0111 : 0b0110;
    else
      return x > -0.23460740596055984f ? 0b0101 : 0b0100;
  else if (x > -0.6106329262256622f)
    return x > -0.4599952697753906f ? 0b0011 : 0b0010;
  else
    return x > -0.8480964004993439f ? 0b0001 : 0b0000;
}

__device__ __forceinline__ unsigned char quantize_fp4(float x) {
  const unsigned char sign = x < 0 ? 0b1000 : 0;
  x = fabsf(x);
  unsigned char c;
  if (x > 0.29166667f)
    if (x > 0.583333f)
      c = x > 0.8333333f ? 0b0011 : 0b0010;
    else
      c = x > 0.4166667f ? 0b101 : 0b100;
  else if (x > 0.0859375f)
    c = x > 0.20833333f ? 0b0111 : 0b0110;
  else
    c = x > 0.00260417f ? 0b0001 : 0b0000;
  return c + sign;
}

// Table-driven coder for the vectorised kernel (fewer instructions than the trees, no
// divergence). The scaled value's range is cut into 256 equal cells — s ∈ [−1, 1] for NF4
// (index ⌊(s+1)·128⌋), |s| ∈ [0, 1] for FP4 (index ⌊|s|·256⌋) — each holding at most one
// threshold. A cell stores how many thresholds lie below it; with the sorted thresholds t
// (padded with +inf), code = below + (s > t[below]): the number of thresholds strictly below
// s, as the trees compute (a cell without a threshold has t[below] ≥ its upper edge > s). The
// FP4 index is exact (power-of-two scaling); for NF4, s+1 rounds by at most 1.2e-7 and no
// threshold lies within 2.3e-4 of a cell edge, so a value rounded into the neighbouring cell
// still counts the same thresholds. NaN indexes cell 0 and fails the comparison: code 0, as
// in the trees. The 256-byte table keeps shared-memory bank conflicts low; t[] has 16
// entries, read conflict-free.
constexpr int LUT_CELLS = 256;

struct CodeLut {
  unsigned char below[LUT_CELLS];
  float t[16];
};

template <bool NF4>
__device__ void build_lut(CodeLut& lut) {
  const float nf4[15] = {-0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
                         -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
                         0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
                         0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
  const float fp4[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
  const int count = NF4 ? 15 : 7;
  if (threadIdx.x < 16) lut.t[threadIdx.x] = threadIdx.x < count ? (NF4 ? nf4[threadIdx.x] : fp4[threadIdx.x])
                                                                  : __int_as_float(0x7f800000);
  for (int c = threadIdx.x; c < LUT_CELLS; c += blockDim.x) {
    const float lo = NF4 ? c * (2.0f / LUT_CELLS) - 1.0f : c * (1.0f / LUT_CELLS);
    unsigned char below = 0;
    for (int k = 0; k < count; k++) below += (NF4 ? nf4[k] : fp4[k]) < lo;
    lut.below[c] = below;
  }
}

__device__ __forceinline__ unsigned char quantize_nf4_lut(const CodeLut& lut, float s) {
  int c = __float2int_rd((s + 1.0f) * (LUT_CELLS / 2));
  c = min(max(c, 0), LUT_CELLS - 1);
  const int below = lut.below[c];
  return below + (s > lut.t[below]);
}

__device__ __forceinline__ unsigned char quantize_fp4_lut(const CodeLut& lut, float s) {
  const unsigned char sign = s < 0 ? 0b1000 : 0;
  const float a = fabsf(s);
  int c = __float2int_rd(a * LUT_CELLS);
  c = min(max(c, 0), LUT_CELLS - 1);
  const int below = lut.below[c];
  const int k = below + (a > lut.t[below]);
  return ((0x32547610u >> (4 * k)) & 0xf) + sign;
}

__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
__constant__ float FP4_LUT[8] = {0.0f, 0.005208333333f, 0.66666667f, 1.0f,
                                 0.33333333f, 0.5f, 0.16666667f, 0.25f};

template <bool NF4>
__device__ __forceinline__ float code_value(unsigned char c) {
  if (NF4) return NF4_CODE[c & 0x0f];
  const float sign = 1.0f - 2 * ((c & 0b1000) >> 3);
  return FP4_LUT[c & 0b111] * sign;
}

template <bool NF4, typename T>
__device__ void quantize_blocks(const T* __restrict__ x, unsigned char* __restrict__ packed,
                                float* __restrict__ absmax, const size_t n, const int bs) {
  const int group = bs / 2 < 32 ? bs / 2 : 32;  // lanes per quantization block
  const int lane = threadIdx.x & 31;
  const int sub = lane / group;                  // which block of this warp's set
  const int glane = lane % group;
  const unsigned mask = 0xffffffffu;  // all 32 lanes reach every shuffle
  const size_t nblocks = (n + bs - 1) / bs;
  const size_t warps = (size_t)gridDim.x * (blockDim.x / 32);
  const size_t warp = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int per_warp = 32 / group;
  for (size_t base = warp * per_warp; base < nblocks; base += warps * per_warp) {
    const size_t b = base + sub;
    const bool valid = b < nblocks;
    const size_t start = b * bs;
    const size_t end = valid ? min(start + bs, n) : start;
    float m = 0.0f;
    for (size_t i = start + 2 * glane; i < end; i += 2 * group) {
      m = fmaxf(m, fabsf(to_f32(x[i])));
      if (i + 1 < end) m = fmaxf(m, fabsf(to_f32(x[i + 1])));
    }
    for (int off = group / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(mask, m, off, group));
    if (!valid) continue;
    if (glane == 0) absmax[b] = m;
    const float scale = rcp_approx_ftz(m);
    for (size_t i = start + 2 * glane; i < end; i += 2 * group) {
      const float hi = mul_ftz(to_f32(x[i]), scale);
      const float lo = mul_ftz(i + 1 < n ? to_f32(x[i + 1]) : 0.0f, scale);
      const unsigned char qh = NF4 ? quantize_nf4(hi) : quantize_fp4(hi);
      const unsigned char ql = NF4 ? quantize_nf4(lo) : quantize_fp4(lo);
      packed[i / 2] = (qh << 4) | ql;
    }
  }
}

// One thread per packed byte: two outputs, code value times the block's f32 absmax.
template <bool NF4, typename T>
__device__ void dequantize_bytes(const unsigned char* __restrict__ packed, const float* __restrict__ absmax,
                                 T* __restrict__ out, const size_t n, const int bs) {
  const size_t bytes = (n + 1) / 2;
  for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < bytes; j += (size_t)gridDim.x * blockDim.x) {
    const unsigned char q = packed[j];
    const size_t i = 2 * j;
    out[i] = from_f32<T>(mul_ftz(code_value<NF4>(q >> 4), absmax[i / bs]));
    if (i + 1 < n) out[i + 1] = from_f32<T>(mul_ftz(code_value<NF4>(q & 0x0f), absmax[(i + 1) / bs]));
  }
}

// Vectorised quantization of full blocks: each lane loads 16 bytes (8 bf16/f16 or 4 f32) at a
// time and stores the matching 4 (or 2) packed bytes in one store. A group of
// G = min(32, bs/V) lanes owns a block; max|x| is reduced with shuffles, then the group reads
// the block again (from L1) to code it. Requires x 16-byte aligned and bs a multiple of V;
// the host runs the scalar kernel above for a partial last block.
template <typename T> struct VecOf;
template <> struct VecOf<float> { static constexpr int N = 4; };
template <> struct VecOf<__nv_bfloat16> { static constexpr int N = 8; };
template <> struct VecOf<__half> { static constexpr int N = 8; };

template <bool NF4, typename T>
__device__ __forceinline__ unsigned int code_vector(const CodeLut& lut, const uint4 raw, const float scale) {
  constexpr int V = VecOf<T>::N;
  const T* e = reinterpret_cast<const T*>(&raw);
  unsigned int word = 0;
#pragma unroll
  for (int k = 0; k < V; k += 2) {
    const float hi = mul_ftz(to_f32(e[k]), scale);
    const float lo = mul_ftz(to_f32(e[k + 1]), scale);
    const unsigned int q = NF4 ? (quantize_nf4_lut(lut, hi) << 4) | quantize_nf4_lut(lut, lo)
                               : (quantize_fp4_lut(lut, hi) << 4) | quantize_fp4_lut(lut, lo);
    word |= q << (8 * (k / 2));
  }
  return word;
}

template <typename T>
__device__ __forceinline__ float vector_absmax(const uint4 raw, float m) {
  constexpr int V = VecOf<T>::N;
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < V; k++) m = fmaxf(m, fabsf(to_f32(e[k])));
  return m;
}

template <typename T>
__device__ __forceinline__ void store_codes(unsigned char* dst, unsigned int word) {
  if (VecOf<T>::N == 8) *reinterpret_cast<unsigned int*>(dst) = word;
  else *reinterpret_cast<unsigned short*>(dst) = (unsigned short)word;
}

// Up to CACHE vectors per lane stay in registers between the max and the coding pass (every
// blocksize up to 256 for bf16/f16, 128 for f32); larger blocks read the block again (L1).
constexpr int CACHE = 4;

template <bool NF4, typename T>
__device__ void quantize_full_blocks(const T* __restrict__ x, unsigned char* __restrict__ packed,
                                     float* __restrict__ absmax, const size_t nblocks, const int bs) {
  constexpr int V = VecOf<T>::N;
  __shared__ CodeLut lut;
  build_lut<NF4>(lut);
  __syncthreads();
  const int vecs = bs / V;
  const int group = vecs < 32 ? vecs : 32;
  const int per_lane = vecs / group;
  const int lane = threadIdx.x & 31;
  const int sub = lane / group;
  const int glane = lane % group;
  const int per_warp = 32 / group;
  const size_t warps = (size_t)gridDim.x * (blockDim.x / 32);
  const size_t warp = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  for (size_t base = warp * per_warp; base < nblocks; base += warps * per_warp) {
    const size_t b = base + sub;
    const bool valid = b < nblocks;
    const uint4* src = reinterpret_cast<const uint4*>(x + b * bs);
    uint4 regs[CACHE];
    float m = 0.0f;
    if (valid) {
      if (per_lane <= CACHE) {
#pragma unroll
        for (int j = 0; j < CACHE; j++)
          if (j < per_lane) {
            regs[j] = src[glane + j * group];
            m = vector_absmax<T>(regs[j], m);
          }
      } else {
        for (int v = glane; v < vecs; v += group) m = vector_absmax<T>(src[v], m);
      }
    }
    for (int off = group / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off, group));
    if (!valid) continue;
    if (glane == 0) absmax[b] = m;
    const float scale = rcp_approx_ftz(m);
    unsigned char* dst = packed + b * bs / 2;
    if (per_lane <= CACHE) {
#pragma unroll
      for (int j = 0; j < CACHE; j++)
        if (j < per_lane) {
          const int v = glane + j * group;
          store_codes<T>(dst + v * V / 2, code_vector<NF4, T>(lut, regs[j], scale));
        }
    } else {
      for (int v = glane; v < vecs; v += group) store_codes<T>(dst + v * V / 2, code_vector<NF4, T>(lut, src[v], scale));
    }
  }
}

// The 8 values of one word of packed codes (4 bytes, high nibble first) times `scale`, stored
// as 16-byte vectors at `dst` (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_word(const float* lut, const unsigned int q, const float scale, T* dst) {
  T vals[8];
#pragma unroll
  for (int k = 0; k < 4; k++) {
    const unsigned char byte = (q >> (8 * k)) & 0xff;
    vals[2 * k] = from_f32<T>(mul_ftz(lut[byte >> 4], scale));
    vals[2 * k + 1] = from_f32<T>(mul_ftz(lut[byte & 0x0f], scale));
  }
  uint4* to = reinterpret_cast<uint4*>(dst);
  const uint4* v = reinterpret_cast<const uint4*>(vals);
#pragma unroll
  for (int k = 0; k < (int)(8 * sizeof(T) / 16); k++) to[k] = v[k];
}

// Where the values from element e of the codes go: at e (ld 0), or in rows of `row_len` values
// (a multiple of 8, so a word's 8 values share a row) laid `ld` values apart — a weight
// dequantized beside columns of its own (the expert adapters' factors, ops::lora_in_k).
__device__ __forceinline__ size_t out_at(const size_t e, const size_t row_len, const size_t ld) {
  if (ld == 0) return e;
  if ((e | row_len) >> 32 == 0) {  // a 32-bit division (a chunk holds < 2^32 values)
    const unsigned int q = (unsigned int)e / (unsigned int)row_len;
    return (size_t)q * ld + (e - (size_t)q * row_len);
  }
  return (e / row_len) * ld + e % row_len;
}

// Vectorised dequantization: each thread turns 4 packed bytes into 8 outputs (16 or 32 bytes
// stored as 16-byte vectors). Requires n_vec a multiple of 8 and aligned pointers; the host
// runs the scalar kernel for the tail.
template <bool NF4, typename T>
__device__ void dequantize_vec(const unsigned int* __restrict__ packed, const float* __restrict__ absmax,
                               T* __restrict__ out, const size_t n_vec, const int bs, const size_t row_len,
                               const size_t ld) {
  // The 16-entry table in shared memory: constant memory serialises a warp whose lanes read
  // different entries, which is every warp here.
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = code_value<NF4>((unsigned char)threadIdx.x);
  __syncthreads();
  const size_t words = n_vec / 8;
  for (size_t w = blockIdx.x * (size_t)blockDim.x + threadIdx.x; w < words; w += (size_t)gridDim.x * blockDim.x) {
    const unsigned int q = packed[w];
    const float scale = absmax[(w * 8) / bs];
    store_word(lut, q, scale, out + out_at(w * 8, row_len, ld));
  }
}

// Dequantization with nested statistics in the same pass (dequantize_absmax's scale, then
// dequantize_vec's values, bit for bit): the block scale of word w is
// f32(map8[q[b]] · nested[(start + b) / 256]) + offset, b = (w · 8) / bs, with q[0] block
// `start` of the parameter. The 256-entry 8-bit map comes by value (no upload per call) and
// is copied to shared memory. Same requirements as dequantize_vec.
struct Map8 {
  float v[256];
};

template <bool NF4, typename T>
__device__ void dequantize_vec_nested(const unsigned int* __restrict__ packed, const unsigned char* __restrict__ q,
                                      const Map8 map8, const float* __restrict__ nested, const float offset,
                                      const size_t start, T* __restrict__ out, const size_t n_vec, const int bs,
                                      const size_t row_len, const size_t ld) {
  __shared__ float lut[16];
  __shared__ float map[256];
  if (threadIdx.x < 16) lut[threadIdx.x] = code_value<NF4>((unsigned char)threadIdx.x);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = map8.v[i];
  __syncthreads();
  const size_t words = n_vec / 8;
  for (size_t w = blockIdx.x * (size_t)blockDim.x + threadIdx.x; w < words; w += (size_t)gridDim.x * blockDim.x) {
    const unsigned int codes = packed[w];
    const size_t b = (w * 8) / bs;
    const float scale = __fadd_rn(mul_ftz(map[q[b]], nested[(start + b) >> 8]), offset);
    store_word(lut, codes, scale, out + out_at(w * 8, row_len, ld));
  }
}

// Nested statistics back to f32 absmax: f32(code8[q] * nested[(start + i) / 256]) + offset, where
// q[0] is block `start` of the parameter (a slice of a parameter's codes, nested array whole).
extern "C" __global__ void dequantize_absmax(const unsigned char* __restrict__ q, const float* __restrict__ code8,
                                             const float* __restrict__ nested, const float offset,
                                             float* __restrict__ out, const size_t n, const size_t start) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __fadd_rn(mul_ftz(code8[q[i]], nested[(start + i) >> 8]), offset);
}

#define QUANT(NAME, T, NF4)                                                                          \
  extern "C" __global__ void NAME(const T* x, unsigned char* packed, float* absmax, const size_t n, \
                                  const int bs) {                                                   \
    quantize_blocks<NF4, T>(x, packed, absmax, n, bs);                                              \
  }
#define DEQUANT(NAME, T, NF4)                                                                             \
  extern "C" __global__ void NAME(const unsigned char* packed, const float* absmax, T* out, const size_t n, \
                                  const int bs) {                                                        \
    dequantize_bytes<NF4, T>(packed, absmax, out, n, bs);                                                \
  }

QUANT(quantize_nf4_f32, float, true)
QUANT(quantize_nf4_bf16, __nv_bfloat16, true)
QUANT(quantize_nf4_f16, __half, true)
QUANT(quantize_fp4_f32, float, false)
QUANT(quantize_fp4_bf16, __nv_bfloat16, false)
QUANT(quantize_fp4_f16, __half, false)
DEQUANT(dequantize_nf4_f32, float, true)
DEQUANT(dequantize_nf4_bf16, __nv_bfloat16, true)
DEQUANT(dequantize_nf4_f16, __half, true)
DEQUANT(dequantize_fp4_f32, float, false)
DEQUANT(dequantize_fp4_bf16, __nv_bfloat16, false)
DEQUANT(dequantize_fp4_f16, __half, false)

#define QUANT_VEC(NAME, T, NF4)                                                                           \
  extern "C" __global__ void NAME(const T* x, unsigned char* packed, float* absmax, const size_t nblocks, \
                                  const int bs) {                                                        \
    quantize_full_blocks<NF4, T>(x, packed, absmax, nblocks, bs);                                        \
  }
#define DEQUANT_VEC(NAME, T, NF4)                                                                         \
  extern "C" __global__ void NAME(const unsigned int* packed, const float* absmax, T* out, const size_t n, \
                                  const int bs) {                                                        \
    dequantize_vec<NF4, T>(packed, absmax, out, n, bs, 0, 0);                                            \
  }                                                                                                       \
  extern "C" __global__ void NAME##_rows(const unsigned int* packed, const float* absmax, T* out,         \
                                         const size_t n, const int bs, const size_t row_len,             \
                                         const size_t ld) {                                              \
    dequantize_vec<NF4, T>(packed, absmax, out, n, bs, row_len, ld);                                     \
  }

QUANT_VEC(quantize_vec_nf4_f32, float, true)
QUANT_VEC(quantize_vec_nf4_bf16, __nv_bfloat16, true)
QUANT_VEC(quantize_vec_nf4_f16, __half, true)
QUANT_VEC(quantize_vec_fp4_f32, float, false)
QUANT_VEC(quantize_vec_fp4_bf16, __nv_bfloat16, false)
QUANT_VEC(quantize_vec_fp4_f16, __half, false)
DEQUANT_VEC(dequantize_vec_nf4_f32, float, true)
DEQUANT_VEC(dequantize_vec_nf4_bf16, __nv_bfloat16, true)
DEQUANT_VEC(dequantize_vec_nf4_f16, __half, true)
DEQUANT_VEC(dequantize_vec_fp4_f32, float, false)
DEQUANT_VEC(dequantize_vec_fp4_bf16, __nv_bfloat16, false)
DEQUANT_VEC(dequantize_vec_fp4_f16, __half, false)

#define DEQUANT_VEC_NESTED(NAME, T, NF4)                                                                  \
  extern "C" __global__ void NAME(const unsigned int* packed, const unsigned char* q, const Map8 map8,    \
                                  const float* nested, const float offset, const size_t start, T* out,   \
                                  const size_t n, const int bs) {                                        \
    dequantize_vec_nested<NF4, T>(packed, q, map8, nested, offset, start, out, n, bs, 0, 0);             \
  }                                                                                                       \
  extern "C" __global__ void NAME##_rows(const unsigned int* packed, const unsigned char* q,              \
                                         const Map8 map8, const float* nested, const float offset,       \
                                         const size_t start, T* out, const size_t n, const int bs,       \
                                         const size_t row_len, const size_t ld) {                        \
    dequantize_vec_nested<NF4, T>(packed, q, map8, nested, offset, start, out, n, bs, row_len, ld);      \
  }

DEQUANT_VEC_NESTED(dequantize_vec_nested_nf4_f32, float, true)
DEQUANT_VEC_NESTED(dequantize_vec_nested_nf4_bf16, __nv_bfloat16, true)
DEQUANT_VEC_NESTED(dequantize_vec_nested_nf4_f16, __half, true)
DEQUANT_VEC_NESTED(dequantize_vec_nested_fp4_f32, float, false)
DEQUANT_VEC_NESTED(dequantize_vec_nested_fp4_bf16, __nv_bfloat16, false)
DEQUANT_VEC_NESTED(dequantize_vec_nested_fp4_f16, __half, false)
