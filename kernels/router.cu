// The router's kernels, one warp per token row: the softmax and top-k choice (Qwen/Mixtral-style
// routers), DeepSeek's and GLM's scored, group-limited choice, and the logits' gradient. Each
// names its CPU twin and its gpu-check entry below.
#include "common.cuh"

// The k largest of a warp's row (v[j] at column lane + 32·j, columns < e) in descending order,
// ties to the lower column — a stable descending sort's first k — written by lane 0 to out[0..k]:
// k rounds of a warp arg-max over each lane's best unpicked value.
template <int L>
__device__ void top_k_desc(const float (&v)[L], const int e, const int k, const int lane, uint32_t* out) {
  uint32_t picked = 0;  // bit j: this lane's element j is taken
  for (int p = 0; p < k; ++p) {
    float best = -INFINITY;
    int best_c = e;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int c = lane + 32 * j;
      if (c < e && !(picked >> j & 1) && (v[j] > best || best_c == e)) {
        best = v[j];
        best_c = c;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffff, best, o);
      const int oc = __shfl_xor_sync(0xffffffff, best_c, o);
      if (ob > best || (ob == best && oc < best_c)) {
        best = ob;
        best_c = oc;
      }
    }
    if (best_c % 32 == lane) picked |= 1u << (best_c / 32);
    if (lane == 0) out[p] = (uint32_t)best_c;
  }
}

// A warp's row of E logits, L a lane (lane + 32·j; −∞ past E) in f32; returns this lane's max.
template <typename T, int L>
__device__ float load_row(const T* row, const int e, const int lane, float (&v)[L]) {
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < L; ++j) {
    const int c = lane + 32 * j;
    v[j] = c < e ? to_f32(row[c]) : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
  return mx;
}

// The row's softmax in place, from each lane's max `mx` (0 past E): exp(v − max) / Σ, both over
// the warp.
template <int L>
__device__ void softmax_in_place(float (&v)[L], float mx, const int e, const int lane) {
  mx = warp_reduce<true>(mx);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < L; ++j) {
    const int c = lane + 32 * j;
    v[j] = c < e ? expf(v[j] - mx) : 0.0f;
    sum += v[j];
  }
  sum = warp_reduce<false>(sum);
#pragma unroll
  for (int j = 0; j < L; ++j) v[j] = v[j] / sum;
}

// router_softmax_topk: one warp per token row of the router's logits [N, E] (any E): probs[t] =
// softmax(logits[t]) in f32 (exp(x − max) / Σ exp(x − max), expf, IEEE division), and, when
// `top` is not null, the k largest probabilities' experts in descending order, ties to the
// lower expert (a stable descending sort's first k), as u32 [N, k]: k rounds of a warp arg-max
// over each lane's best unpicked probability. E ≤ 32 · ROUTER_PER_LANE, k ≤ E (the caller
// checks and picks the kernel: router_softmax_topk_{L}_T holds L = 1, 2, 4, 8, 16 or 32
// experts a lane — fewer registers and steps than the largest size for every E, same values).
// CPU twin: src/ops/router.rs (softmax_last, then arg_sort). Checked: src/gpu_check/ops/rows.rs
// (the "router" entries).
template <typename T, int ROUTER_PER_LANE>
__device__ void router_softmax_topk(const T* logits, float* probs, uint32_t* top, const size_t n, const int e,
                                    const int k) {
  const size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n) return;
  const int lane = threadIdx.x % 32;
  float v[ROUTER_PER_LANE];
  softmax_in_place<ROUTER_PER_LANE>(v, load_row<T, ROUTER_PER_LANE>(logits + t * e, e, lane, v), e, lane);
  float* out = probs + t * e;
#pragma unroll
  for (int j = 0; j < ROUTER_PER_LANE; ++j) {
    const int c = lane + 32 * j;
    if (c < e) {
      out[c] = v[j];
    } else {
      v[j] = -INFINITY;
    }
  }
  if (top == nullptr) return;
  top_k_desc<ROUTER_PER_LANE>(v, e, k, lane, top + t * k);
}

// router_choose: DeepSeek's and GLM's routers, one warp per token row of the logits [N, E] (L
// experts a lane, as router_softmax_topk): scores[t] = sigmoid (1 / (1 + exp(−x))) or softmax of
// the logits in f32; for the choice the scores plus `bias` (null: none); with `groups` > 0 the
// experts in groups of E / groups, each group scored by its best choice score (`rule` 0) or the
// sum of its two best (`rule` 1), all but the `keep` best groups (ties to the lower group) left
// out; then the k best experts, descending, ties to the lower expert (top [N, k]). groups ≤ 32.
// CPU twin: src/ops/router.rs (router_choose's candle ops). Checked: src/gpu_check/ops/rows.rs
// (the "router" entries, choose cases).
template <typename T, int L>
__device__ void router_choose(const T* logits, const float* bias, float* scores, uint32_t* top,
                              const size_t n, const int e, const int k, const int sigmoid,
                              const int groups, const int keep, const int rule) {
  const size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n) return;
  const int lane = threadIdx.x % 32;
  float v[L];
  const float mx = load_row<T, L>(logits + t * e, e, lane, v);
  if (sigmoid) {
#pragma unroll
    for (int j = 0; j < L; ++j) v[j] = 1.0f / (expf(-v[j]) + 1.0f);
  } else {
    softmax_in_place<L>(v, mx, e, lane);
  }
  float* out = scores + t * e;
#pragma unroll
  for (int j = 0; j < L; ++j) {
    const int c = lane + 32 * j;
    if (c < e) {
      out[c] = v[j];
      if (bias != nullptr) v[j] += bias[c];
    } else {
      v[j] = -INFINITY;
    }
  }
  if (groups > 0) {
    const int per = e / groups;
    float mine = -INFINITY;  // lane g: group g's score
    for (int g = 0; g < groups; ++g) {
      float a1 = -INFINITY, a2 = -INFINITY;  // the group's best two on this lane
#pragma unroll
      for (int j = 0; j < L; ++j) {
        const int c = lane + 32 * j;
        if (c < e && c / per == g) {
          if (v[j] > a1) {
            a2 = a1;
            a1 = v[j];
          } else if (v[j] > a2) {
            a2 = v[j];
          }
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float b1 = __shfl_xor_sync(0xffffffff, a1, o), b2 = __shfl_xor_sync(0xffffffff, a2, o);
        const float hi = fmaxf(a1, b1);
        a2 = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
        a1 = hi;
      }
      const float score = rule == 1 && per >= 2 ? a1 + a2 : a1;
      if (lane == g) mine = score;
    }
    uint32_t kept = 0;  // bit g: group g kept
    for (int p = 0; p < keep; ++p) {
      float best = lane < groups && !(kept >> lane & 1) ? mine : -INFINITY;
      int best_g = lane < groups && !(kept >> lane & 1) ? lane : 32;
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffff, best, o);
        const int og = __shfl_xor_sync(0xffffffff, best_g, o);
        if (og < 32 && (best_g == 32 || ob > best || (ob == best && og < best_g))) {
          best = ob;
          best_g = og;
        }
      }
      kept |= 1u << best_g;
    }
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int c = lane + 32 * j;
      if (c < e && !(kept >> (c / per) & 1)) v[j] = -INFINITY;
    }
  }
  top_k_desc<L>(v, e, k, lane, top + t * k);
}

// router_bwd: the router logits' gradient, one warp per token row (L experts a lane, as
// router_softmax_topk; k ≤ 32: lane j < k holds choice j). From the routing weights' gradient
// dw [N, k] (f32) through the scaling, the optional renormalisation (w = sel / Σ sel: dsel =
// (dw − Σ dw·w) / Σ sel), the top-k selection (dprobs = dsel at the chosen experts, 0 elsewhere)
// and the softmax (dlogits = p · (dprobs − Σ dprobs·p)) or the sigmoid (dprobs · p · (1 − p)) of
// the f32 probabilities p [N, E]; dlogits [N, E] in T. The sums run over the warp (another
// order than the CPU twin's). CPU twin: src/ops/router.rs (logits_grad's candle ops). Checked:
// src/gpu_check/ops/rows.rs (the "router backward" entries).
template <typename T, int L>
__device__ void router_bwd(const float* probs, const uint32_t* top, const float* dw, T* dlogits, const size_t n,
                           const int e, const int k, const float scaling, const int renormalize,
                           const int sigmoid) {
  const size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n) return;
  const int lane = threadIdx.x % 32;
  const float* p_row = probs + t * e;
  uint32_t chosen = 0xffffffffu;
  float dsel = 0.0f, sel = 0.0f;
  if (lane < k) {
    chosen = top[t * k + lane];
    dsel = dw[t * k + lane] * scaling;
    sel = p_row[chosen];
  }
  if (renormalize) {
    const float total = warp_reduce<false>(sel);
    const float s = warp_reduce<false>(lane < k ? dsel * (sel / total) : 0.0f);
    dsel = (dsel - s) / total;
  }
  float p[L], dp[L];
#pragma unroll
  for (int i = 0; i < L; ++i) {
    const int c = lane + 32 * i;
    p[i] = c < e ? p_row[c] : 0.0f;
    dp[i] = 0.0f;
  }
  for (int j = 0; j < k; ++j) {
    const uint32_t cj = __shfl_sync(0xffffffff, chosen, j);
    const float dj = __shfl_sync(0xffffffff, dsel, j);
#pragma unroll
    for (int i = 0; i < L; ++i) {
      if (cj == (uint32_t)(lane + 32 * i)) dp[i] += dj;
    }
  }
  float dot = 0.0f;
  if (!sigmoid) {
#pragma unroll
    for (int i = 0; i < L; ++i) dot += dp[i] * p[i];
    dot = warp_reduce<false>(dot);
  }
  T* out = dlogits + t * e;
#pragma unroll
  for (int i = 0; i < L; ++i) {
    const int c = lane + 32 * i;
    if (c < e) out[c] = from_f32<T>(sigmoid ? dp[i] * (p[i] * (1.0f - p[i])) : p[i] * (dp[i] - dot));
  }
}

#define ROUTER(T, SUFFIX, L)                                                                          \
  extern "C" __global__ void router_softmax_topk_##L##_##SUFFIX(const T* logits, float* probs, uint32_t* top, \
                                                                const size_t n, const int e, const int k) { \
    router_softmax_topk<T, L>(logits, probs, top, n, e, k);                                         \
  }                                                                                                   \
  extern "C" __global__ void router_bwd_##L##_##SUFFIX(const float* probs, const uint32_t* top, const float* dw, \
                                                       T* dlogits, const size_t n, const int e, const int k, \
                                                       const float scaling, const int renormalize,    \
                                                       const int sigmoid) {                           \
    router_bwd<T, L>(probs, top, dw, dlogits, n, e, k, scaling, renormalize, sigmoid);              \
  }                                                                                                   \
  extern "C" __global__ void router_choose_##L##_##SUFFIX(const T* logits, const float* bias,         \
                                                          float* scores, uint32_t* top, const size_t n, \
                                                          const int e, const int k, const int sigmoid, \
                                                          const int groups, const int keep,           \
                                                          const int rule) {                           \
    router_choose<T, L>(logits, bias, scores, top, n, e, k, sigmoid, groups, keep, rule);           \
  }

#define ROUTER_KERNELS(T, SUFFIX)                                                                     \
  ROUTER(T, SUFFIX, 1) ROUTER(T, SUFFIX, 2) ROUTER(T, SUFFIX, 4) ROUTER(T, SUFFIX, 8)                 \
  ROUTER(T, SUFFIX, 16) ROUTER(T, SUFFIX, 32)

ROUTER_KERNELS(float, f32)
ROUTER_KERNELS(__nv_bfloat16, bf16)
ROUTER_KERNELS(__half, f16)
