// Routing gathers. CPU twins in src/ops/routing/mod.rs, as candle ops: gather_sum_reference
// (gather_sum*), index_select (gather_rows*, spread_rows*), the host loop of `plan`
// (route_count, route_rows), combine_backward's candle branch (combine_bwd); the embedding's
// host-table gather: src/ops/embedding.rs (gather_host_rows). Checked: src/gpu_check/ops/mod.rs
// (the "routing gather/combine" and "routed experts" entries), src/gpu_check/ops/dots.rs
// ("routing combine rows", "token-major = row by row") and src/gpu_check/ops/rows.rs ("routing
// plan", "embedding rows").
// gather_sum[_weighted]: out[t, c] = Σ_{j<k} w[t·k+j] · src[idx[t·k+j], c] (w = 1 unweighted),
//   f32 accumulation, one rounding; src [M, h], idx/w [tokens·k], out [tokens, h]. Grid-stride.
//   The _vec kernels move 16 bytes per load and store (h a multiple of 16 / sizeof(T), both
//   buffers 16-byte aligned) and give the same values. With k = 1 and no weight it is a row
//   gather (exact: every dtype converts to f32 and back unchanged).
// route_count: counts[e] += number of slots s < slots with top[s] == e (counts zeroed by the
//   caller; experts <= 1024, a shared histogram per block). Grid-stride.
// route_rows: one block per expert e (blockIdx.x), 1024 threads, 16 consecutive slots per thread
//   per step: the rows of expert e start after the rows of experts 0..e (counts from
//   route_count) and follow slot order (token-major, as the CPU plan): tokens[row] = s / k,
//   slots[row] = s, inv[s] = row.
// combine_bwd: one block per routed row r (token t = tokens[r], slot s = slots[r]):
//   dy[r, c] = w[s] · dout[t, c];  dw[s] = Σ_c dout[t, c] · y[r, c]  (f32). combine_bwd_vec: the
//   same in 16-byte packs.
#include "common.cuh"

template <typename T, bool WEIGHTED>
__device__ void gather_sum(const T* src, const uint32_t* idx, const float* w, T* out, const size_t tokens,
                           const int k, const size_t h) {
  const size_t n = tokens * h;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t t = i / h, c = i % h;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const size_t slot = t * k + j;
      const float v = to_f32(src[(size_t)idx[slot] * h + c]);
      acc += WEIGHTED ? w[slot] * v : v;
    }
    out[i] = from_f32<T>(acc);
  }
}

// I: the index type of the element loop (32-bit when tokens·h fits: a 64-bit division per pack
// cost as much as the k = 1 gather's memory traffic).
template <typename T, bool WEIGHTED, typename I>
__device__ void gather_sum_vec_by(const T* src, const uint32_t* idx, const float* w, T* out, const I tokens,
                                  const int k, const I h) {
  constexpr int P = 16 / sizeof(T);
  const I packs = h / P;
  const I n = tokens * packs;
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
    const I t = i / packs, c = (i - t * packs) * P;
    float acc[P];
#pragma unroll
    for (int e = 0; e < P; ++e) acc[e] = 0.0f;
#pragma unroll 4
    for (int j = 0; j < k; ++j) {
      const size_t slot = (size_t)t * k + j;
      const uint4 raw = *reinterpret_cast<const uint4*>(src + (size_t)idx[slot] * h + c);
      const T* v = reinterpret_cast<const T*>(&raw);
      const float wj = WEIGHTED ? w[slot] : 1.0f;
#pragma unroll
      for (int e = 0; e < P; ++e) acc[e] += WEIGHTED ? wj * to_f32(v[e]) : to_f32(v[e]);
    }
    uint4 packed;
    T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int e = 0; e < P; ++e) o[e] = from_f32<T>(acc[e]);
    *reinterpret_cast<uint4*>(out + (size_t)t * h + c) = packed;
  }
}

template <typename T, bool WEIGHTED>
__device__ void gather_sum_vec(const T* src, const uint32_t* idx, const float* w, T* out, const size_t tokens,
                               const int k, const size_t h) {
  const size_t reach = (size_t)gridDim.x * blockDim.x;
  if (tokens * h < (1ull << 31) && reach < (1ull << 31)) {
    gather_sum_vec_by<T, WEIGHTED, uint32_t>(src, idx, w, out, (uint32_t)tokens, k, (uint32_t)h);
  } else {
    gather_sum_vec_by<T, WEIGHTED, size_t>(src, idx, w, out, tokens, k, h);
  }
}

// gather_rows_vec: out[t] = src[idx[t]] (the k = 1, unweighted gather_sum: a row copy), one
// warp per output row, 16-byte packs, ROW_UNROLL packs per lane loaded before any is stored
// (the rows are random reads: more loads in flight than one pack per thread keeps). h a
// multiple of 16 / sizeof(T), both buffers 16-byte aligned. Grid-stride over rows, 8 per block.
// Output rows lie `ldo` elements apart (h, or wider: the expert adapters' hidden goes in the
// columns past h — src/ops/lora_in_k.rs; those are not written here).
// WEIGHTED (gather_rows_weighted_vec): out[t] = w[t] · src[idx[t]] in f32, one rounding — the
// k = 1 gather_sum_weighted's values (its sum starts at 0: 0 + w · v, so −0 becomes +0 alike).
constexpr int ROW_UNROLL = 4;

template <typename T, bool WEIGHTED>
__device__ void gather_rows_vec(const T* src, const uint32_t* idx, const float* w, T* out, const size_t rows,
                                const size_t h, const size_t ldo) {
  constexpr int P = 16 / sizeof(T);
  const size_t packs = h / P;
  const int lane = threadIdx.x % 32;
  for (size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32; t < rows;
       t += (size_t)gridDim.x * (blockDim.x / 32)) {
    const uint4* from = reinterpret_cast<const uint4*>(src + (size_t)idx[t] * h);
    uint4* to = reinterpret_cast<uint4*>(out + t * ldo);
    const float wt = WEIGHTED ? w[t] : 1.0f;
    for (size_t p = lane; p < packs; p += 32 * ROW_UNROLL) {
      Pack<T> v[ROW_UNROLL];
#pragma unroll
      for (int u = 0; u < ROW_UNROLL; ++u) {
        if (p + 32 * u < packs) v[u].v = from[p + 32 * u];
      }
#pragma unroll
      for (int u = 0; u < ROW_UNROLL; ++u) {
        if (p + 32 * u < packs) {
          if (WEIGHTED) {
#pragma unroll
            for (int e = 0; e < P; ++e) v[u].e[e] = from_f32<T>(0.0f + wt * to_f32(v[u].e[e]));
          }
          to[p + 32 * u] = v[u].v;
        }
      }
    }
  }
}

// spread_rows_vec: the same rows as gather_rows_vec over idx = tokens, read token-major:
// out[inv[t·k + j]] = src[t] for each token t and slot j < k — each source row read once and
// written k times (row by row in expert order, each token row is read k times, far apart, and
// mostly from HBM once the rows outgrow L2). One warp per token, ROW_UNROLL packs per lane in
// registers while they go to the k rows. WEIGHTED: w [N·k] (f32, slot order),
// out[inv[s]] = w[s] · src[t] in f32, one rounding — gather_rows_weighted_vec's values (its
// weights are w in row order). A permutation's writes: no two slots share a row (RowOrder).
// RANGE (spread_rows_range_vec): only the rows in [lo, hi) are written, row r at
// out + (r − lo)·h — a chunk of experts' rows, one range of the expert-sorted order
// (src/ops/expert_chunks.rs); a token with no row there is not read. Without RANGE the row
// loads go out before any of the token's row indices is read.
template <typename T, bool WEIGHTED, bool RANGE = false>
__device__ void spread_rows_vec(const T* src, const uint32_t* inv, const float* w, T* out, const size_t tokens,
                                const int k, const size_t h, const uint32_t lo = 0,
                                const uint32_t hi = 0xffffffffu) {
  constexpr int P = 16 / sizeof(T);
  const size_t packs = h / P;
  const int lane = threadIdx.x % 32;
  for (size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32; t < tokens;
       t += (size_t)gridDim.x * (blockDim.x / 32)) {
    if (RANGE) {
      bool any = false;
      for (int j = 0; j < k; ++j) {
        const uint32_t r = inv[t * k + j];
        any |= r >= lo && r < hi;
      }
      if (!any) continue;
    }
    const uint4* from = reinterpret_cast<const uint4*>(src + t * h);
    for (size_t p = lane; p < packs; p += 32 * ROW_UNROLL) {
      Pack<T> v[ROW_UNROLL];
#pragma unroll
      for (int u = 0; u < ROW_UNROLL; ++u) {
        if (p + 32 * u < packs) v[u].v = from[p + 32 * u];
      }
      for (int j = 0; j < k; ++j) {
        const size_t s = t * k + j;
        const uint32_t r = inv[s];
        if (RANGE && (r < lo || r >= hi)) continue;
        uint4* to = reinterpret_cast<uint4*>(out + (size_t)(r - lo) * h);
        const float wt = WEIGHTED ? w[s] : 1.0f;
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) {
          if (p + 32 * u < packs) {
            Pack<T> x = v[u];
            if (WEIGHTED) {
#pragma unroll
              for (int e = 0; e < P; ++e) x.e[e] = from_f32<T>(0.0f + wt * to_f32(v[u].e[e]));
            }
            to[p + 32 * u] = x.v;
          }
        }
      }
    }
  }
}

extern "C" __global__ void route_count(const uint32_t* top, uint32_t* counts, const size_t slots,
                                       const int experts) {
  extern __shared__ uint32_t hist[];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (size_t s = blockIdx.x * (size_t)blockDim.x + threadIdx.x; s < slots; s += (size_t)gridDim.x * blockDim.x) {
    const uint32_t e = top[s];
    if (e < (uint32_t)experts) atomicAdd(&hist[e], 1u);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    if (hist[e]) atomicAdd(&counts[e], hist[e]);
  }
}

constexpr int ROUTE_THREADS = 1024;
constexpr int ROUTE_SLOTS = 16;  // consecutive slots per thread per step (fewer barrier rounds)

extern "C" __global__ void route_rows(const uint32_t* top, const uint32_t* counts, uint32_t* tokens,
                                      uint32_t* slot_of_row, uint32_t* inv, const size_t slots, const int k) {
  __shared__ uint32_t warp_total[ROUTE_THREADS / 32];
  __shared__ uint32_t start;
  const uint32_t e = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) {
    uint32_t sum = 0;
    for (uint32_t f = 0; f < e; ++f) sum += counts[f];
    start = sum;
  }
  __syncthreads();
  uint32_t row = start;
  // Each step covers ROUTE_THREADS · ROUTE_SLOTS slots, thread t the ROUTE_SLOTS from
  // base + t · ROUTE_SLOTS: a thread's matches follow the matches of all lower threads, so an
  // exclusive scan of the per-thread counts keeps slot order.
  for (size_t base = 0; base < slots; base += ROUTE_THREADS * ROUTE_SLOTS) {
    const size_t first = base + (size_t)threadIdx.x * ROUTE_SLOTS;
    uint32_t mine = 0;  // bit u: slot first + u is expert e's
#pragma unroll
    for (int u = 0; u < ROUTE_SLOTS; ++u) {
      if (first + u < slots && top[first + u] == e) mine |= 1u << u;
    }
    const uint32_t count = __popc(mine);
    uint32_t incl = count;  // inclusive scan over the warp's lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t v = __shfl_up_sync(0xffffffff, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    uint32_t before = 0, total = 0;
    for (int w = 0; w < ROUTE_THREADS / 32; ++w) {
      const uint32_t c = warp_total[w];
      before += w < warp ? c : 0;
      total += c;
    }
    uint32_t r = row + before + incl - count;
#pragma unroll
    for (int u = 0; u < ROUTE_SLOTS; ++u) {
      if (mine >> u & 1) {
        const size_t s = first + u;
        tokens[r] = (uint32_t)(s / k);
        slot_of_row[r] = (uint32_t)s;
        inv[s] = r;
        ++r;
      }
    }
    row += total;
    __syncthreads();  // warp_total is rewritten by the next step
  }
}

constexpr int THREADS = 256;

template <typename T>
__device__ void combine_bwd(const T* dout, const T* y, const float* w, const uint32_t* tokens,
                            const uint32_t* slots, T* dy, float* dw, const size_t h) {
  __shared__ float shared[THREADS / 32];
  const size_t r = blockIdx.x;
  const size_t t = tokens[r], s = slots[r];
  const float wv = w[s];
  float dot = 0.0f;
  for (size_t c = threadIdx.x; c < h; c += THREADS) {
    const float d = to_f32(dout[t * h + c]);
    dy[r * h + c] = from_f32<T>(wv * d);
    dot += d * to_f32(y[r * h + c]);
  }
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < THREADS / 32; ++i) sum += shared[i];
    dw[s] = sum;
  }
}

// combine_bwd over 16-byte packs (h a multiple of 16 / sizeof(T), all rows 16-byte aligned):
// the same values, the dot product's terms summed in another order.
template <typename T>
__device__ void combine_bwd_vec(const T* dout, const T* y, const float* w, const uint32_t* tokens,
                                const uint32_t* slots, T* dy, float* dw, const size_t h) {
  __shared__ float shared[THREADS / 32];
  constexpr int P = 16 / sizeof(T);
  const size_t r = blockIdx.x;
  const size_t t = tokens[r], s = slots[r];
  const float wv = w[s];
  const uint4* d_row = reinterpret_cast<const uint4*>(dout + t * h);
  const uint4* y_row = reinterpret_cast<const uint4*>(y + r * h);
  uint4* dy_row = reinterpret_cast<uint4*>(dy + r * h);
  float dot = 0.0f;
  for (size_t p = threadIdx.x; p < h / P; p += THREADS) {
    Pack<T> d, yv, o;
    d.v = d_row[p];
    yv.v = y_row[p];
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const float dv = to_f32(d.e[e]);
      o.e[e] = from_f32<T>(wv * dv);
      dot += dv * to_f32(yv.e[e]);
    }
    dy_row[p] = o.v;
  }
  dot = block_reduce<THREADS, false>(dot, shared);
  if (threadIdx.x == 0) dw[s] = dot;
}

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

#define ROUTING_KERNELS(T, SUFFIX)                                                                    \
  extern "C" __global__ void gather_sum_##SUFFIX(const T* src, const uint32_t* idx, T* out,          \
                                                 const size_t tokens, const int k, const size_t h) { \
    gather_sum<T, false>(src, idx, nullptr, out, tokens, k, h);                                     \
  }                                                                                                   \
  extern "C" __global__ void gather_sum_weighted_##SUFFIX(const T* src, const uint32_t* idx,         \
                                                          const float* w, T* out,                    \
                                                          const size_t tokens, const int k,          \
                                                          const size_t h) {                          \
    gather_sum<T, true>(src, idx, w, out, tokens, k, h);                                            \
  }                                                                                                   \
  extern "C" __global__ void gather_sum_vec_##SUFFIX(const T* src, const uint32_t* idx, T* out,      \
                                                     const size_t tokens, const int k,               \
                                                     const size_t h) {                               \
    gather_sum_vec<T, false>(src, idx, nullptr, out, tokens, k, h);                                 \
  }                                                                                                   \
  extern "C" __global__ void gather_sum_weighted_vec_##SUFFIX(const T* src, const uint32_t* idx,     \
                                                              const float* w, T* out,                \
                                                              const size_t tokens, const int k,      \
                                                              const size_t h) {                      \
    gather_sum_vec<T, true>(src, idx, w, out, tokens, k, h);                                        \
  }                                                                                                   \
  extern "C" __global__ void combine_bwd_##SUFFIX(const T* dout, const T* y, const float* w,         \
                                                  const uint32_t* tokens, const uint32_t* slots,     \
                                                  T* dy, float* dw, const size_t h) {                \
    combine_bwd(dout, y, w, tokens, slots, dy, dw, h);                                              \
  }                                                                                                   \
  extern "C" __global__ void combine_bwd_vec_##SUFFIX(const T* dout, const T* y, const float* w,     \
                                                      const uint32_t* tokens, const uint32_t* slots, \
                                                      T* dy, float* dw, const size_t h) {            \
    combine_bwd_vec(dout, y, w, tokens, slots, dy, dw, h);                                          \
  }                                                                                                   \
  ROUTER(T, SUFFIX, 1) ROUTER(T, SUFFIX, 2) ROUTER(T, SUFFIX, 4) ROUTER(T, SUFFIX, 8)                 \
  ROUTER(T, SUFFIX, 16) ROUTER(T, SUFFIX, 32)                                                         \
  extern "C" __global__ void gather_rows_vec_##SUFFIX(const T* src, const uint32_t* idx, T* out,     \
                                                      const size_t rows, const size_t h,             \
                                                      const size_t ldo) {                            \
    gather_rows_vec<T, false>(src, idx, nullptr, out, rows, h, ldo);                               \
  }                                                                                                   \
  extern "C" __global__ void gather_rows_weighted_vec_##SUFFIX(const T* src, const uint32_t* idx,    \
                                                               const float* w, T* out,               \
                                                               const size_t rows, const size_t h,    \
                                                               const size_t ldo) {                   \
    gather_rows_vec<T, true>(src, idx, w, out, rows, h, ldo);                                      \
  }                                                                                                   \
  extern "C" __global__ void spread_rows_vec_##SUFFIX(const T* src, const uint32_t* inv, T* out,     \
                                                      const size_t tokens, const int k,              \
                                                      const size_t h) {                              \
    spread_rows_vec<T, false>(src, inv, nullptr, out, tokens, k, h);                               \
  }                                                                                                   \
  extern "C" __global__ void spread_rows_weighted_vec_##SUFFIX(const T* src, const uint32_t* inv,    \
                                                               const float* w, T* out,               \
                                                               const size_t tokens, const int k,     \
                                                               const size_t h) {                     \
    spread_rows_vec<T, true>(src, inv, w, out, tokens, k, h);                                      \
  }                                                                                                   \
  extern "C" __global__ void spread_rows_range_vec_##SUFFIX(const T* src, const uint32_t* inv, T* out,\
                                                            const size_t tokens, const int k,        \
                                                            const size_t h, const uint32_t lo,       \
                                                            const uint32_t hi) {                     \
    spread_rows_vec<T, false, true>(src, inv, nullptr, out, tokens, k, h, lo, hi);                 \
  }

ROUTING_KERNELS(float, f32)
ROUTING_KERNELS(__nv_bfloat16, bf16)
ROUTING_KERNELS(__half, f16)
