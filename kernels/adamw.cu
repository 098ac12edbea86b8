// AdamW in one pass, in place: for each f32 element, with the scalars the host derives from the
// step (src/train/adamw.rs):
//   g ← clip·g (when clipping)                      m ← β1·m + (1−β1)·g
//   v ← β2·v + (1−β2)·g²                            p ← p·decay − step_size · m / (√v·inv_sqrt_bias2 + ε)
// Each operation is the f32 operation of the tensor-op formulation in the same order, rounded
// on its own (the __f*_rn intrinsics keep nvcc from contracting them into FMAs), so the fused
// update equals the op-by-op one bit for bit: a scalar multiply-add of candle's (`affine`) is
// x·mul rounded, then + add rounded. Launch: 1-D grid-stride loop over n.
// CPU twin: src/train/adamw.rs (`AdamW::step` with candle's tensor ops).
// Checked: src/gpu_check/ops/adamw.rs (the "adamw" entries, bit-identical).
#include <stddef.h>

__device__ __forceinline__ float affine(float x, float mul, float add) {
  return __fadd_rn(__fmul_rn(x, mul), add);
}

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, const size_t n,
                                     const int clipping, const float clip, const float beta1,
                                     const float one_minus_beta1, const float beta2,
                                     const float one_minus_beta2, const float decay,
                                     const float inv_sqrt_bias2, const float eps,
                                     const float step_size) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i];
    if (clipping) gi = affine(gi, clip, 0.0f);
    const float mi = __fadd_rn(affine(m[i], beta1, 0.0f), affine(gi, one_minus_beta1, 0.0f));
    const float vi = __fadd_rn(affine(v[i], beta2, 0.0f), affine(__fmul_rn(gi, gi), one_minus_beta2, 0.0f));
    const float decayed = affine(p[i], decay, 0.0f);
    const float denom = affine(affine(__fsqrt_rn(vi), inv_sqrt_bias2, 0.0f), 1.0f, eps);
    const float update = affine(__fdiv_rn(mi, denom), step_size, 0.0f);
    m[i] = mi;
    v[i] = vi;
    p[i] = __fsub_rn(decayed, update);
  }
}
