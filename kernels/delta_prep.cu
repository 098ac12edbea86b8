// The delta rule's packed inputs from Gated DeltaNet's conv output (src/ops/delta_prep_op.rs has
// the equations): conv [rows, C] (C = 2·Hk·Dk + Hv·Dv: q heads | k heads | v heads) →
// out [rows, Hv, 2Dk + Dv] f32 = s·q/‖q‖ | k/‖k‖ | v, value head h reading key head h / (Hv/Hk),
// ‖x‖ = √(Σx² + eps). Forward: one warp per (row, value head). Backward: one warp per (row, key
// head), the group's value heads' gradients summed in order, then the L2 norm's backward.
// Sums in f32 over lanes, then across the warp (the CPU twin sums in index order: f32 ulps).
// CPU twin: src/ops/delta_prep_op.rs. Checked: src/gpu_check/ops/linear_attn.rs ("delta_prep").
#include "common.cuh"

template <typename T>
__device__ void prep_fwd(const T* conv, float* out, const long long rows, const int hk, const int hv, const int dk,
                         const int dv, const float scale, const float eps) {
  const long long warp = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * hv) return;
  const long long bt = warp / hv;
  const int vh = (int)(warp % hv), kh = vh / (hv / hk);
  const T* row = conv + bt * (2LL * hk * dk + (long long)hv * dv);
  const T* q = row + (long long)kh * dk;
  const T* k = row + (long long)(hk + kh) * dk;
  const T* v = row + 2LL * hk * dk + (long long)vh * dv;
  float sq = 0.0f, sk = 0.0f;
  for (int i = lane; i < dk; i += 32) {
    const float a = to_f32(q[i]), b = to_f32(k[i]);
    sq += a * a;
    sk += b * b;
  }
  sq = warp_reduce<false>(sq);
  sk = warp_reduce<false>(sk);
  const float iq = 1.0f / sqrtf(sq + eps), ik = 1.0f / sqrtf(sk + eps);
  float* o = out + warp * (2LL * dk + dv);
  for (int i = lane; i < dk; i += 32) {
    o[i] = to_f32(q[i]) * iq * scale;
    o[dk + i] = to_f32(k[i]) * ik;
  }
  for (int i = lane; i < dv; i += 32) o[2 * dk + i] = to_f32(v[i]);
}

template <typename T>
__device__ void prep_bwd(const T* conv, const float* dy, T* dx, const long long rows, const int hk, const int hv,
                         const int dk, const int dv, const float scale, const float eps) {
  const long long warp = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * hk) return;
  const long long bt = warp / hk, c = 2LL * hk * dk + (long long)hv * dv, w = 2LL * dk + dv;
  const int kh = (int)(warp % hk), r = hv / hk;
  const T* row = conv + bt * c;
  T* drow = dx + bt * c;
  const float* d0 = dy + (bt * hv + (long long)kh * r) * w;  // the group's first value head
  for (int part = 0; part < 2; ++part) {
    const long long at = (long long)(part * hk + kh) * dk;
    const float s = part == 0 ? scale : 1.0f;
    float ss = 0.0f, dot = 0.0f;
    for (int i = lane; i < dk; i += 32) {
      float d = 0.0f;
      for (int j = 0; j < r; ++j) d += d0[j * w + part * dk + i];
      const float x = to_f32(row[at + i]);
      ss += x * x;
      dot += x * d;
    }
    ss = warp_reduce<false>(ss);
    dot = warp_reduce<false>(dot);
    const float inv = 1.0f / sqrtf(ss + eps), inv3 = inv * inv * inv;
    for (int i = lane; i < dk; i += 32) {
      float d = 0.0f;
      for (int j = 0; j < r; ++j) d += d0[j * w + part * dk + i];
      const float x = to_f32(row[at + i]);
      drow[at + i] = from_f32<T>(s * (d * inv - x * inv3 * dot));
    }
  }
  for (int j = 0; j < r; ++j) {
    T* dv_out = drow + 2LL * hk * dk + (long long)(kh * r + j) * dv;
    for (int i = lane; i < dv; i += 32) dv_out[i] = from_f32<T>(d0[j * w + 2 * dk + i]);
  }
}

#define DELTA_PREP(T, NAME)                                                                                         \
  extern "C" __global__ void delta_prep_fwd_##NAME(const T* conv, float* out, const long long rows, const int hk, \
                                                   const int hv, const int dk, const int dv, const float scale,   \
                                                   const float eps) {                                             \
    prep_fwd<T>(conv, out, rows, hk, hv, dk, dv, scale, eps);                                                     \
  }                                                                                                               \
  extern "C" __global__ void delta_prep_bwd_##NAME(const T* conv, const float* dy, T* dx, const long long rows,    \
                                                   const int hk, const int hv, const int dk, const int dv,        \
                                                   const float scale, const float eps) {                          \
    prep_bwd<T>(conv, dy, dx, rows, hk, hv, dk, dv, scale, eps);                                                  \
  }
DELTA_PREP(float, f32)
DELTA_PREP(__nv_bfloat16, bf16)
DELTA_PREP(__half, f16)
