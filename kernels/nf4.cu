// Blockwise 4-bit (NF4 / FP4) quantization and dequantization, bit-exact with bitsandbytes'
// CUDA kernels (kQuantizeBlockwise, kDequantizeBlockwise, built with --use_fast_math).
// CPU twin: src/quant/blockwise.rs. Golden data: tests/fixtures/nf4/.
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

// Nested statistics back to f32 absmax: f32(code8[q] * nested[i / 256]) + offset.
extern "C" __global__ void dequantize_absmax(const unsigned char* __restrict__ q, const float* __restrict__ code8,
                                             const float* __restrict__ nested, const float offset,
                                             float* __restrict__ out, const size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __fadd_rn(mul_ftz(code8[q[i]], nested[i >> 8]), offset);
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
