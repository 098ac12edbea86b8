// Fused causal attention within packed sequences (the FlashAttention-2 recurrence) for bf16 with
// head size HD of 64 or 128, on tensor cores (mma.sync m16n8k16, ldmatrix; sm_80 and later).
// Layout: q, dq, out [B, S, nh, HD]; k, v, dk, dv [B, S, kvh, HD] (query head h uses kv head
// h / (nh / kvh)); segments [B, S] u32; lse and dot [B, S, nh] f32. Query i sees key j when
// j <= i, i − j < window (gpt-oss's sliding window; INT_MAX: none) and segments[b, j] ==
// segments[b, i]; key tiles wholly left of every row's window are skipped, as are the query
// tiles past a key tile's reach in dk/dv. `scale_log2` is the softmax scale times log2(e)
// (exponentials are exp2), and lse is kept in that base-2 domain: P = exp2(scale_log2·qk − lse).
//   flash_fwd:     out = softmax(scale·q·kᵀ)·v, lse = log2 Σ exp2(scale_log2·qk)
//   flash_bwd_dot: dot = Σ_d dout·out (per row)
//   flash_bwd_dq:  dq = scale · Σ_j P ∘ (dout·vᵀ − dot) · k
//   flash_bwd_dkv: dv = Σ_i Pᵀ·dout, dk = scale · Σ_i (P ∘ (dout·vᵀ − dot))ᵀ · q over the query
//                  heads of each kv head (no atomics: deterministic)
// Tiles: 64 query rows (16 per warp) by 64 keys; the tile that streams (keys in forward/dq,
// queries in dkv) is double-buffered with cp.async. Launch: 128 threads; grid (ceil(S/64),
// nh, B) for fwd/dq, (ceil(S/64), kvh, B) for dkv, dynamic shared memory from smem_bytes below
// (src/ops/flash_attn.rs); flash_bwd_dot: grid ceil(B·S·nh / 4), 128 threads.
// Attention sinks (gpt-oss) stay outside the kernels: src/ops/attn_sinks.rs folds them into
// out and lse after the forward, and the backward, given those, computes the sink attention's
// gradients.
// CPU twin: the blocked attention of src/ops/attention.rs (BlockedAttention::forward, ::backward).
// Checked: src/gpu_check/ops/attention.rs (the bf16 "attention" entries at head sizes 64 and 128,
// with a window of 128 and sinks at 64, and "attention_block").
#include "common.cuh"

typedef __nv_bfloat16 bf16;
constexpr int TILE = 64;
constexpr int THREADS = 128;
constexpr int PAD = 8;  // elements of row padding: ldmatrix rows land on distinct banks

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global → shared, zero-filled when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void ldsm(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_t(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a·b for one 16×8 tile (a: 16×16 row-major fragment, b: 16×8 column fragment).
__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A tile of 64 rows × HD from rows row0.. of a [S, ld]-strided matrix into shared [64][HD+PAD];
// rows at or past S are zero.
template <int HD>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int row0, int S, int ld) {
  constexpr int CHUNKS = HD / 8;
  for (int c = threadIdx.x; c < TILE * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    const int g = row0 + r;
    cp16(dst + r * (HD + PAD) + col, src + (size_t)min(g, S - 1) * ld + col, g < S);
  }
}

// 64 u32 (or f32) of a [S, stride]-strided vector from row0.., zero past S.
__device__ __forceinline__ void load_vec(uint32_t* dst, const uint32_t* src, int row0, int S, int stride) {
  const int t = threadIdx.x;
  if (t < TILE) {
    const int g = row0 + t;
    cp4(dst + t, src + (size_t)min(g, S - 1) * stride, g < S);
  }
}

// A fragments (16 rows × 16 cols at k step kk) of rows r0.. of a shared [.][HD+PAD] tile.
template <int HD>
__device__ __forceinline__ void frag_a(uint32_t* a, const bf16* tile, int r0, int kk) {
  const int lane = threadIdx.x % 32;
  ldsm(a, tile + (r0 + lane % 16) * (HD + PAD) + kk * 16 + (lane / 16) * 8);
}

// B fragments of two adjacent 8-column n tiles (nt, nt+1) at k step kk where B[k][n] =
// tile[n][k] (b = {b0, b1} of nt, {b2, b3} of nt+1): for x·tileᵀ.
template <int HD>
__device__ __forceinline__ void frag_bt(uint32_t* b, const bf16* tile, int nt, int kk) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  ldsm(b, tile + (nt * 8 + (m >> 1) * 8 + lane % 8) * (HD + PAD) + kk * 16 + (m & 1) * 8);
}

// B fragments of n tiles (nt, nt+1) at k step kk where B[k][n] = tile[k][n]: for x·tile.
template <int HD>
__device__ __forceinline__ void frag_b(uint32_t* b, const bf16* tile, int nt, int kk) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  ldsm_t(b, tile + (kk * 16 + (m & 1) * 8 + lane % 8) * (HD + PAD) + nt * 8 + (m >> 1) * 8);
}

// acc[16 × 64] = rows r0.. of a (shared, HD wide) · bᵀ (shared tile of 64 rows, HD wide).
template <int HD>
__device__ __forceinline__ void gemm_abt(float (*acc)[4], const bf16* a, int r0, const bf16* b) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t af[4];
    frag_a<HD>(af, a, r0, kk);
#pragma unroll
    for (int nt = 0; nt < 8; nt += 2) {
      uint32_t bf[4];
      frag_bt<HD>(bf, b, nt, kk);
      mma(acc[nt], af, bf[0], bf[1]);
      mma(acc[nt + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[16 × HD] += p[16 × 64] (registers, accumulator layout) · b (shared tile [64][HD]).
template <int HD>
__device__ __forceinline__ void gemm_pb(float (*acc)[4], float (*p)[4], const bf16* b) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t af[4] = {pack_bf16(p[2 * kk][0], p[2 * kk][1]), pack_bf16(p[2 * kk][2], p[2 * kk][3]),
                            pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt += 2) {
      uint32_t bf[4];
      frag_b<HD>(bf, b, nt, kk);
      mma(acc[nt], af, bf[0], bf[1]);
      mma(acc[nt + 1], af, bf[2], bf[3]);
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Forward. Shared: Q tile, then two stages of (K tile, V tile, key segments).
template <int HD>
__device__ void flash_fwd(const bf16* q, const bf16* k, const bf16* v, const uint32_t* segments, bf16* out,
                          float* lse, const int S, const int nh, const int kvh, const int window,
                          const float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int T = TILE * (HD + PAD);  // elements of one shared tile
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* skv = sq + T;  // stage s: K at skv + 2·s·T, V after it
  uint32_t* sseg = reinterpret_cast<uint32_t*>(skv + 4 * T);  // stage s: sseg + s·TILE
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * TILE, h = blockIdx.y, b = blockIdx.z;  // longest first
  const int kv = h / (nh / kvh);
  const bf16* qb = q + ((size_t)b * S * nh + h) * HD;
  const bf16* kb = k + ((size_t)b * S * kvh + kv) * HD;
  const bf16* vb = v + ((size_t)b * S * kvh + kv) * HD;
  const uint32_t* seg = segments + (size_t)b * S;
  const int ldq = nh * HD, ldk = kvh * HD;
  const int tiles = min(q0 + TILE - 1, S - 1) / TILE + 1;
  const int first = max(0, q0 - window + 1) / TILE;  // the first key tile row q0 sees

  auto load_kv = [&](int t) {
    const int s = t & 1;
    load_rows<HD>(skv + 2 * s * T, kb, t * TILE, S, ldk);
    load_rows<HD>(skv + (2 * s + 1) * T, vb, t * TILE, S, ldk);
    load_vec(sseg + s * TILE, seg, t * TILE, S, 1);
  };
  load_rows<HD>(sq, qb, q0, S, ldq);
  load_kv(first);
  cp_commit();

  int row[2];
  uint32_t rseg[2];
  float m[2], l[2];
  for (int i = 0; i < 2; ++i) {
    row[i] = q0 + warp * 16 + lane / 4 + 8 * i;
    rseg[i] = row[i] < S ? seg[row[i]] : 0;
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  float o[HD / 8][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;

  for (int t = first; t < tiles; ++t) {
    if (t + 1 < tiles) load_kv(t + 1);
    cp_commit();
    cp_wait_all_but_one();
    __syncthreads();
    const int s = t & 1;
    const bf16* sk = skv + 2 * s * T;
    const bf16* sv = sk + T;
    const uint32_t* ks = sseg + s * TILE;
    float p[8][4];
    gemm_abt<HD>(p, sq, warp * 16, sk);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jt = nt * 8 + (lane % 4) * 2 + (e & 1);
        const int j = t * TILE + jt, i = e / 2;
        const bool visible = j <= row[i] && row[i] - j < window && row[i] < S && ks[jt] == rseg[i];
        p[nt][e] = visible ? p[nt][e] * scale_log2 : -INFINITY;
        mx[i] = fmaxf(mx[i], p[nt][e]);
      }
    }
    float use[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
      const float mnew = fmaxf(m[i], mx[i]);
      use[i] = mnew == -INFINITY ? 0.0f : mnew;  // nothing visible yet: keep exp2 finite
      const float alpha = exp2f(m[i] - use[i]);
      m[i] = mnew;
      l[i] *= alpha;
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        o[nt][2 * i] *= alpha;
        o[nt][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[nt][e] = exp2f(p[nt][e] - use[e / 2]);
        l[e / 2] += p[nt][e];
      }
    }
    gemm_pb<HD>(o, p, sv);
    __syncthreads();  // this stage is reloaded next iteration
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    if (row[i] >= S) continue;
    const float inv = 1.0f / l[i];  // key i itself is always visible: l > 0
    bf16* orow = out + ((size_t)b * S + row[i]) * ldq + (size_t)h * HD;
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(orow + nt * 8 + (lane % 4) * 2) =
          pack_bf16(o[nt][2 * i] * inv, o[nt][2 * i + 1] * inv);
    }
    if (lane % 4 == 0) lse[((size_t)b * S + row[i]) * nh + h] = m[i] + log2f(l[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// dot = Σ_d dout·out per (b, i, h) row, one warp per row.
template <int HD>
__device__ void flash_bwd_dot(const bf16* dout, const bf16* out, float* dot, const size_t rows) {
  const size_t r = (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
  for (int d = lane; d < HD; d += 32) acc += to_f32(dout[r * HD + d]) * to_f32(out[r * HD + d]);
  acc = warp_reduce<false>(acc);
  if (lane == 0) dot[r] = acc;
}

// ---------------------------------------------------------------------------------------------
// dq. Shared: Q and dout tiles, then two stages of (K, V, key segments).
template <int HD>
__device__ void flash_bwd_dq(const bf16* q, const bf16* k, const bf16* v, const uint32_t* segments,
                             const bf16* dout, const float* lse, const float* dot, bf16* dq, const int S,
                             const int nh, const int kvh, const int window, const float scale_log2,
                             const float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int T = TILE * (HD + PAD);  // elements of one shared tile
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* sdo = sq + T;
  bf16* skv = sdo + T;
  uint32_t* sseg = reinterpret_cast<uint32_t*>(skv + 4 * T);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * TILE, h = blockIdx.y, b = blockIdx.z;  // longest first
  const int kv = h / (nh / kvh);
  const int ldq = nh * HD, ldk = kvh * HD;
  const bf16* kb = k + ((size_t)b * S * kvh + kv) * HD;
  const bf16* vb = v + ((size_t)b * S * kvh + kv) * HD;
  const uint32_t* seg = segments + (size_t)b * S;
  const int tiles = min(q0 + TILE - 1, S - 1) / TILE + 1;
  const int first = max(0, q0 - window + 1) / TILE;  // the first key tile row q0 sees

  auto load_kv = [&](int t) {
    const int s = t & 1;
    load_rows<HD>(skv + 2 * s * T, kb, t * TILE, S, ldk);
    load_rows<HD>(skv + (2 * s + 1) * T, vb, t * TILE, S, ldk);
    load_vec(sseg + s * TILE, seg, t * TILE, S, 1);
  };
  load_rows<HD>(sq, q + ((size_t)b * S * nh + h) * HD, q0, S, ldq);
  load_rows<HD>(sdo, dout + ((size_t)b * S * nh + h) * HD, q0, S, ldq);
  load_kv(first);
  cp_commit();

  int row[2];
  uint32_t rseg[2];
  float rl[2], rd[2];
  for (int i = 0; i < 2; ++i) {
    row[i] = q0 + warp * 16 + lane / 4 + 8 * i;
    const bool in = row[i] < S;
    rseg[i] = in ? seg[row[i]] : 0;
    rl[i] = in ? lse[((size_t)b * S + row[i]) * nh + h] : 0.0f;
    rd[i] = in ? dot[((size_t)b * S + row[i]) * nh + h] : 0.0f;
  }
  float acc[HD / 8][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

  for (int t = first; t < tiles; ++t) {
    if (t + 1 < tiles) load_kv(t + 1);
    cp_commit();
    cp_wait_all_but_one();
    __syncthreads();
    const int s = t & 1;
    const bf16* sk = skv + 2 * s * T;
    const bf16* sv = sk + T;
    const uint32_t* ks = sseg + s * TILE;
    float p[8][4], dp[8][4];
    gemm_abt<HD>(p, sq, warp * 16, sk);
    gemm_abt<HD>(dp, sdo, warp * 16, sv);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jt = nt * 8 + (lane % 4) * 2 + (e & 1);
        const int j = t * TILE + jt, i = e / 2;
        const bool visible = j <= row[i] && row[i] - j < window && row[i] < S && ks[jt] == rseg[i];
        const float pr = visible ? exp2f(p[nt][e] * scale_log2 - rl[i]) : 0.0f;
        p[nt][e] = pr * (dp[nt][e] - rd[i]);  // dS / scale
      }
    }
    gemm_pb<HD>(acc, p, sk);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (row[i] >= S) continue;
    bf16* r = dq + ((size_t)b * S + row[i]) * ldq + (size_t)h * HD;
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(r + nt * 8 + (lane % 4) * 2) =
          pack_bf16(acc[nt][2 * i] * scale, acc[nt][2 * i + 1] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dk, dv. Shared: K and V tiles (this block's 64 keys), then two stages of (Q, dout, query
// segments, lse, dot) streaming over the query heads of this kv head and their query tiles.
template <int HD>
__device__ void flash_bwd_dkv(const bf16* q, const bf16* k, const bf16* v, const uint32_t* segments,
                              const bf16* dout, const float* lse, const float* dot, bf16* dk, bf16* dv,
                              const int S, const int nh, const int kvh, const int window,
                              const float scale_log2, const float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int T = TILE * (HD + PAD);  // elements of one shared tile
  bf16* sk = reinterpret_cast<bf16*>(smem);
  bf16* sv = sk + T;
  bf16* sqd = sv + T;  // stage s: Q at sqd + 2·s·T, dout after it
  uint32_t* svec = reinterpret_cast<uint32_t*>(sqd + 4 * T);  // stage s: seg, lse, dot at svec + 3·s·TILE
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kt = blockIdx.x, k0 = kt * TILE, kv = blockIdx.y, b = blockIdx.z;
  const int rep = nh / kvh;
  const int ldq = nh * HD, ldk = kvh * HD;
  const uint32_t* seg = segments + (size_t)b * S;
  // Causal: query tiles kt.. only; windowed: up to the tile of the last query that sees key
  // k0 + TILE − 1 (64-bit: window may be INT_MAX).
  const int reach = (int)min((long long)S - 1, (long long)k0 + TILE - 2 + window);
  const int qtiles = reach / TILE + 1 - kt;
  const int steps = rep * qtiles;

  auto load_q = [&](int it) {
    const int s = it & 1, h = kv * rep + it / qtiles, q0 = (kt + it % qtiles) * TILE;
    load_rows<HD>(sqd + 2 * s * T, q + ((size_t)b * S * nh + h) * HD, q0, S, ldq);
    load_rows<HD>(sqd + (2 * s + 1) * T, dout + ((size_t)b * S * nh + h) * HD, q0, S, ldq);
    uint32_t* vs = svec + 3 * s * TILE;
    load_vec(vs, seg, q0, S, 1);
    load_vec(vs + TILE, reinterpret_cast<const uint32_t*>(lse) + (size_t)b * S * nh + h, q0, S, nh);
    load_vec(vs + 2 * TILE, reinterpret_cast<const uint32_t*>(dot) + (size_t)b * S * nh + h, q0, S, nh);
  };
  load_rows<HD>(sk, k + ((size_t)b * S * kvh + kv) * HD, k0, S, ldk);
  load_rows<HD>(sv, v + ((size_t)b * S * kvh + kv) * HD, k0, S, ldk);
  load_q(0);
  cp_commit();

  int key[2];
  uint32_t kseg[2];
  for (int i = 0; i < 2; ++i) {
    key[i] = k0 + warp * 16 + lane / 4 + 8 * i;
    kseg[i] = key[i] < S ? seg[key[i]] : 0;
  }
  float gk[HD / 8][4], gv[HD / 8][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) {
    gk[nt][0] = gk[nt][1] = gk[nt][2] = gk[nt][3] = 0.0f;
    gv[nt][0] = gv[nt][1] = gv[nt][2] = gv[nt][3] = 0.0f;
  }

  for (int it = 0; it < steps; ++it) {
    if (it + 1 < steps) load_q(it + 1);
    cp_commit();
    cp_wait_all_but_one();
    __syncthreads();
    const int s = it & 1, q0 = (kt + it % qtiles) * TILE;
    const bf16* sq = sqd + 2 * s * T;
    const bf16* sdo = sq + T;
    const uint32_t* qs = svec + 3 * s * TILE;
    const float* ql = reinterpret_cast<const float*>(qs + TILE);
    const float* qd = reinterpret_cast<const float*>(qs + 2 * TILE);
    float p[8][4], dp[8][4];  // transposed: rows are keys, columns queries
    gemm_abt<HD>(p, sk, warp * 16, sq);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int it_ = nt * 8 + (lane % 4) * 2 + (e & 1);
        const int i = q0 + it_, r = e / 2;
        const bool visible = key[r] <= i && i - key[r] < window && i < S && key[r] < S && qs[it_] == kseg[r];
        p[nt][e] = visible ? exp2f(p[nt][e] * scale_log2 - ql[it_]) : 0.0f;
      }
    }
    gemm_pb<HD>(gv, p, sdo);
    gemm_abt<HD>(dp, sv, warp * 16, sdo);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int it_ = nt * 8 + (lane % 4) * 2 + (e & 1);
        p[nt][e] *= dp[nt][e] - qd[it_];  // dSᵀ / scale
      }
    }
    gemm_pb<HD>(gk, p, sq);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (key[i] >= S) continue;
    const size_t at = ((size_t)b * S + key[i]) * ldk + (size_t)kv * HD;
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
      const int c = nt * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(dk + at + c) = pack_bf16(gk[nt][2 * i] * scale, gk[nt][2 * i + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv + at + c) = pack_bf16(gv[nt][2 * i], gv[nt][2 * i + 1]);
    }
  }
}

#define FLASH(HD)                                                                                            \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_fwd_hd##HD(                                   \
      const bf16* q, const bf16* k, const bf16* v, const uint32_t* seg, bf16* out, float* lse, const int S,   \
      const int nh, const int kvh, const int window, const float scale_log2) {                               \
    flash_fwd<HD>(q, k, v, seg, out, lse, S, nh, kvh, window, scale_log2);                                   \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
      flash_bwd_dot_hd##HD(const bf16* dout, const bf16* out, float* dot, const size_t rows) {               \
    flash_bwd_dot<HD>(dout, out, dot, rows);                                                                 \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_dq_hd##HD(                                \
      const bf16* q, const bf16* k, const bf16* v, const uint32_t* seg, const bf16* dout, const float* lse,  \
      const float* dot, bf16* dq, const int S, const int nh, const int kvh, const int window,                \
      const float scale_log2, const float scale) {                                                           \
    flash_bwd_dq<HD>(q, k, v, seg, dout, lse, dot, dq, S, nh, kvh, window, scale_log2, scale);               \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_dkv_hd##HD(                               \
      const bf16* q, const bf16* k, const bf16* v, const uint32_t* seg, const bf16* dout, const float* lse,  \
      const float* dot, bf16* dk, bf16* dv, const int S, const int nh, const int kvh, const int window,      \
      const float scale_log2, const float scale) {                                                           \
    flash_bwd_dkv<HD>(q, k, v, seg, dout, lse, dot, dk, dv, S, nh, kvh, window, scale_log2, scale);          \
  }

FLASH(64)
FLASH(128)
