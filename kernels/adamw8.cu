// AdamW with 8-bit blockwise moments (bitsandbytes' 8-bit Adam scheme): each block of 256
// elements keeps its first moment as codes of the signed dynamic map and its second as codes
// of the unsigned one, each with an f32 block absmax. One CTA per block, one element per
// thread: dequantize (code value · absmax), the f32 AdamW update of src/train/adamw.rs in the
// same order and roundings as kernels/adamw.cu, then the block's new absmax (max |m|, max v;
// 1 where all are zero) and each moment's nearest code to value / absmax (the lower code on
// a tie). The maps are sorted ascending; 256 entries each.
// Launch: grid ⌈n/256⌉, block 256. CPU twin: src/train/adamw8.rs (`update_cpu`).
// Checked: src/gpu_check/ops/adamw.rs (the "adamw 8-bit" entries, bit-identical).
#include "common.cuh"

namespace {

constexpr int BLOCK = 256;

__device__ __forceinline__ float affine(float x, float mul, float add) {
  return __fadd_rn(__fmul_rn(x, mul), add);
}

// The index of the code nearest to x in the ascending map q (the lower one on a tie).
__device__ __forceinline__ int nearest(const float* q, float x) {
  int lo = 0, hi = BLOCK;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (q[mid] < x) lo = mid + 1; else hi = mid;
  }
  if (lo == 0) return 0;
  if (lo == BLOCK) return BLOCK - 1;
  return fabsf(__fsub_rn(x, q[lo - 1])) <= fabsf(__fsub_rn(q[lo], x)) ? lo - 1 : lo;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(BLOCK)
    adamw8_f32(float* p, const float* g, uint8_t* mq, float* mabs, uint8_t* vq, float* vabs,
               const float* map_signed, const float* map_unsigned, const size_t n, const int clipping,
               const float clip, const float beta1, const float one_minus_beta1, const float beta2,
               const float one_minus_beta2, const float decay, const float inv_sqrt_bias2,
               const float eps, const float step_size) {
  __shared__ float qs[BLOCK], qu[BLOCK], red[BLOCK / 32];
  const int t = threadIdx.x;
  qs[t] = map_signed[t];
  qu[t] = map_unsigned[t];
  __syncthreads();
  const size_t b = blockIdx.x, i = b * BLOCK + t;
  const bool in = i < n;
  float mi = 0.0f, vi = 0.0f;
  if (in) {
    const float m0 = __fmul_rn(qs[mq[i]], mabs[b]);
    const float v0 = __fmul_rn(qu[vq[i]], vabs[b]);
    float gi = g[i];
    if (clipping) gi = affine(gi, clip, 0.0f);
    mi = __fadd_rn(affine(m0, beta1, 0.0f), affine(gi, one_minus_beta1, 0.0f));
    vi = __fadd_rn(affine(v0, beta2, 0.0f), affine(__fmul_rn(gi, gi), one_minus_beta2, 0.0f));
    const float decayed = affine(p[i], decay, 0.0f);
    const float denom = affine(affine(__fsqrt_rn(vi), inv_sqrt_bias2, 0.0f), 1.0f, eps);
    p[i] = __fsub_rn(decayed, affine(__fdiv_rn(mi, denom), step_size, 0.0f));
  }
  // Every thread has read the old absmax (above) before thread 0 overwrites it (below): the
  // reductions synchronize the block.
  float am = block_reduce<BLOCK, true>(fabsf(mi), red);
  float av = block_reduce<BLOCK, true>(vi, red);
  if (am == 0.0f) am = 1.0f;
  if (av == 0.0f) av = 1.0f;
  if (in) {
    mq[i] = (uint8_t)nearest(qs, __fdiv_rn(mi, am));
    vq[i] = (uint8_t)nearest(qu, __fdiv_rn(vi, av));
  }
  if (t == 0) {
    mabs[b] = am;
    vabs[b] = av;
  }
}
