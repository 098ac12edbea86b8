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
