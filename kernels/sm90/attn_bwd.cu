// Causal attention's backward on Hopper (sm_90a), bf16, rows of one sample each: CuTe's wgmma
// atoms, two warp groups a CTA, one CTA per (key block, kv head, row, part of the kv head's
// query heads). For its key block a CTA loops over its query heads and the query tiles at or
// after the diagonal, and for each tile computes
//
//   Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ       (keys × queries; P = exp(S·scale − lse), masked above the diagonal)
//   dSᵀ = Pᵀ ∘ (dPᵀ − Δ)          (Δ = rowsum(dO ∘ O), `attn_delta` below)
//   dV += Pᵀ·dO, dK += dSᵀ·Q     (kept in registers over the loop)
//   dQ part = dS·K               (added into an f32 accumulator in a fixed order)
//
// Pᵀ and dSᵀ go through shared memory (bf16) to be the A operands of the last three products.
// Deterministic: a query tile's dQ parts are added in key-block order from its last contributing
// block down to block 0 (the diagonal block writes the accumulator without reading it, block 0
// writes the bf16 result × scale), each CTA waiting on a per-(row, head, tile) counter for its
// turn; where a kv head's query heads are split over several CTAs, their dK/dV parts are added
// in part order the same way. Each CTA takes its place from a ticket drawn as it starts (key
// blocks last to first, parts in order), so a CTA only ever waits on CTAs that started before
// it (no deadlock whatever the residency or the order the hardware starts CTAs in).
// launch/bench/attn_bwd_model.py models these loops and the ordering in numpy.
//
// Host side: src/ops/attn_sm90.rs (what it serves, scratch, the switch MOEQ_ATTN_BWD);
// CPU twin: the blocked attention's backward (src/ops/attention.rs), compared in gpu-check's
// attention rows; docs/ARCHITECTURE.md decision 36.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/numeric_types.h"

using namespace cute;

namespace moeq_attn_bwd {

using Bf16 = cutlass::bfloat16_t;

constexpr int kBlockM = 64;  // query rows a tile
constexpr int kThreads = 256;  // two warp groups

// Must match `Args` in src/ops/attn_sm90.rs.
struct Args {
  const Bf16 *q, *k, *v, *out, *dout;  // [B, S, H | KVH, D | DV]
  const float *lse;                    // [B, H, S], natural log (cuDNN's statistics)
  Bf16 *dq, *dk, *dv;                  // as q, k, v
  float *delta;                        // [B, H, S], written here
  float *dq_acc;                       // [B, S, H, D]
  float *dk_acc, *dv_acc;              // [B, S, KVH, D | DV]; used when parts > 1
  int *counters;                       // B·H·S/64 for dQ, B·KVH·S/64 for dK/dV, a ticket
  int b, s, h, kvh, hd, vd, parts;  // rows, positions, heads, kv heads, head sizes
  float scale;
  int stage;  // 1: a step's dQ part is added during the next step's first products
};
static_assert(sizeof(Args) == 152, "Args must match Args in src/ops/attn_sm90.rs");

// A tile's swizzle: its head dimension is split at `half` between the warp groups of the
// products that read it N-major, and each group's slice must start on an atom boundary.
template <int Half>
using AtomK = std::conditional_t<
    Half % 64 == 0, GMMA::Layout_K_SW128_Atom<Bf16>,
    std::conditional_t<Half % 32 == 0, GMMA::Layout_K_SW64_Atom<Bf16>, GMMA::Layout_K_SW32_Atom<Bf16>>>;

// (rows, cols) K-major tile and its transposed view (cols, rows).
template <class Atom, int Rows, int Cols>
struct Tile {
  using Layout = decltype(tile_to_shape(Atom{}, Shape<Int<Rows>, Int<Cols>>{}));
  using Transposed = decltype(composition(
      Layout{}, make_layout(Shape<Int<Cols>, Int<Rows>>{}, Stride<Int<Rows>, _1>{})));
};

template <int D, int DV, int BN, bool Staged>
struct Config {
  static constexpr int WgN = BN / 64;  // warp groups along the key rows
  static constexpr int WgD = 2 / WgN;  // along the head dimension (and the queries of S)
  static_assert(WgN * WgD == 2, "two warp groups");
  using Q = Tile<AtomK<D / 2>, kBlockM, D>;
  using K = Tile<AtomK<D / 2>, BN, D>;
  using V = Tile<AtomK<64>, BN, DV>;  // read K-major only
  using dO = Tile<AtomK<DV / WgD>, kBlockM, DV>;
  using Pt = Tile<GMMA::Layout_K_SW128_Atom<Bf16>, BN, kBlockM>;  // Pᵀ and dSᵀ

  using WgLayout = Layout<Shape<Int<WgN>, Int<WgD>, _1>>;
  // Sᵀ and dPᵀ: keys × queries.
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Bf16, Bf16, float, Shape<_64, Int<kBlockM / WgD>, _16>,
                           GMMA::Major::K, GMMA::Major::K>(),
      WgLayout{}));
  // dK (keys × D) and dV (keys × DV): A = dSᵀ / Pᵀ, B = Qᵀ / dOᵀ (N-major views).
  using MmadK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Bf16, Bf16, float, Shape<_64, Int<D / WgD>, _16>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WgLayout{}));
  using MmadV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Bf16, Bf16, float, Shape<_64, Int<DV / WgD>, _16>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WgLayout{}));
  // dQ (queries × D): A = dS (the M-major view of dSᵀ), B = K (N-major view), D split in halves.
  using MmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Bf16, Bf16, float, Shape<_64, Int<D / 2>, _16>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));

  struct alignas(1024) Smem {
    alignas(1024) Bf16 k[cosize_v<typename K::Layout>];
    alignas(1024) Bf16 v[cosize_v<typename V::Layout>];
    alignas(1024) Bf16 q[2][cosize_v<typename Q::Layout>];
    alignas(1024) Bf16 dout[2][cosize_v<typename dO::Layout>];
    alignas(1024) Bf16 pt[cosize_v<typename Pt::Layout>];
    alignas(1024) Bf16 dst[cosize_v<typename Pt::Layout>];
    alignas(16) float lse[2][kBlockM];
    alignas(16) float delta[2][kBlockM];
    // Staged: each thread's dQ part of the previous step, slot i · kThreads + thread.
    alignas(16) float dq_stage[Staged ? kBlockM * D : 4];
  };
};

// cp.async of a (rows, cols) bf16 tile at `src` (row stride `ld` elements) into `dst`: 16 bytes
// a thread, 8 threads a row of 64 columns.
template <int Rows, int Cols, class SmemLayout>
__device__ void load_tile(const Bf16 *src, int64_t ld, Bf16 *dst) {
  auto copy = make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Bf16>{},
                              Layout<Shape<_32, _8>, Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{});
  Tensor g = make_tensor(make_gmem_ptr(src), make_shape(Int<Rows>{}, Int<Cols>{}),
                         make_stride(ld, _1{}));
  Tensor s = make_tensor(make_smem_ptr(dst), SmemLayout{});
  auto thr = copy.get_thread_slice(threadIdx.x);
  cute::copy(copy, thr.partition_S(g), thr.partition_D(s));
}

// 64 floats by 16 threads.
__device__ void load_row(const float *src, float *dst) {
  if (threadIdx.x < kBlockM / 4) {
    const auto *s = reinterpret_cast<const cute::uint128_t *>(src) + threadIdx.x;
    auto *d = reinterpret_cast<cute::uint128_t *>(dst) + threadIdx.x;
    SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(*s, *d);
  }
}

// Accumulates A·B into C over the K blocks (zeroing C first when `Zero`); the caller fences
// and commits the batch.
template <bool Zero, class Mma, class TA, class TB, class TC>
__device__ void mma(Mma &m, TA const &a, TB const &b, TC &c) {
  if constexpr (Zero) m.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(m, a(_, _, kb), b(_, _, kb), c);
    m.accumulate_ = GMMA::ScaleOut::One;
  }
}

__device__ int load_acquire(const int *p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ void store_release(int *p, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// A turn not given within this long is a bug in the ordering, never a slow GPU (a whole
// backward takes milliseconds): the kernel traps instead of hanging — the next synchronising
// CUDA call reports the error and the context is unusable, so the process exits with it.
constexpr uint64_t kWaitLimitNs = 20'000'000'000ull;

// Waits until `*counter` is `turn` (one thread spins; the CTA then proceeds).
__device__ void wait_turn(const int *counter, int turn) {
  if (threadIdx.x == 0) {
    // In units of 2^20 ns (≈ 1 ms), 32 bits: a 64-bit start spilled at heads of 256.
    const uint32_t start = uint32_t(now_ns() >> 20);
    while (load_acquire(counter) != turn) {
      __nanosleep(64);
      if (uint32_t(now_ns() >> 20) - start > uint32_t(kWaitLimitNs >> 20)) __trap();
    }
  }
  __syncthreads();
}

// After the CTA's writes: makes them visible, then hands the turn on.
__device__ void pass_turn(int *counter, int next) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) store_release(counter, next);
}

// Adds the CTA's part (`value(i)` at coordinates `coord(i)` of a tile) into the rows at `base`
// (row stride `ld`): the first part writes f32 without reading, the last writes bf16 × `scale`
// to `out`, the others read-add-write f32.
// Elements come in pairs of adjacent columns (the wgmma accumulator's layout), moved as float2
// / bf16×2 where the pair is adjacent and aligned, one by one otherwise. The reads go in
// batches of `kBatch` pairs, all issued before the batch's stores: a store into `base` may
// alias any later read as far as the compiler knows, so pair-by-pair code would wait one
// L2/HBM round trip per pair (16 a step at heads of 128).
template <class Value, class TCoord>
__device__ void add_part(Value value, TCoord const &coord, float *base, Bf16 *out, int64_t ld,
                         bool first, bool last, float scale) {
  constexpr int kPairs = size(TCoord{}) / 2;
  static_assert(size(TCoord{}) % 2 == 0, "pairs");
  constexpr int kBatch = kPairs % 8 == 0 ? 8 : kPairs % 4 == 0 ? 4 : 2;
  static_assert(kPairs % kBatch == 0, "whole batches");
  auto offset = [&](int i) { return get<0>(coord(i)) * ld + get<1>(coord(i)); };
  CUTE_UNROLL
  for (int p0 = 0; p0 < kPairs; p0 += kBatch) {
    float2 y[kBatch];
    CUTE_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int i = 2 * (p0 + j);
      const int64_t o = offset(i), o1 = offset(i + 1);
      if (first) {
        y[j] = make_float2(0.f, 0.f);  // not read
      } else if (o1 == o + 1 && o % 2 == 0) {
        y[j] = __ldcg(reinterpret_cast<const float2 *>(base + o));
      } else {
        y[j] = make_float2(__ldcg(base + o), __ldcg(base + o1));
      }
    }
    CUTE_UNROLL
    for (int j = 0; j < kBatch; ++j) {
      const int i = 2 * (p0 + j);
      const int64_t o = offset(i), o1 = offset(i + 1);
      float2 x = make_float2(value(i), value(i + 1));
      if (!first) {
        x.x += y[j].x;
        x.y += y[j].y;
      }
      if (o1 == o + 1 && o % 2 == 0) {
        if (last) {
          *reinterpret_cast<__nv_bfloat162 *>(out + o) =
              __floats2bfloat162_rn(x.x * scale, x.y * scale);
        } else {
          __stcg(reinterpret_cast<float2 *>(base + o), x);
        }
      } else if (last) {
        out[o] = Bf16(x.x * scale);
        out[o1] = Bf16(x.y * scale);
      } else {
        __stcg(base + o, x.x);
        __stcg(base + o1, x.y);
      }
    }
  }
}

// The counters: B·H·S/64 for dQ's tiles, B·KVH·S/64 for dK/dV's key blocks, then the ticket.
__host__ __device__ inline int64_t ticket_index(const Args &a) {
  return (int64_t(a.b) * a.h + int64_t(a.b) * a.kvh) * (a.s / kBlockM);
}

template <int D, int DV, int BN, bool Staged>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_kernel(const Args a) {
  using C = Config<D, DV, BN, Staged>;
  using Smem = typename C::Smem;
  extern __shared__ char smem_raw[];
  Smem &sm = *reinterpret_cast<Smem *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int tid = threadIdx.x;
  // The CTA's place from a ticket taken as it starts, not from blockIdx: CTAs then wait only
  // on CTAs that started before them, whatever order the hardware dispatches them in.
  __shared__ int ticket;
  if (tid == 0) ticket = atomicAdd(a.counters + ticket_index(a), 1);
  __syncthreads();
  const int x = ticket % gridDim.x, y = ticket / gridDim.x % gridDim.y;
  const int b = ticket / (gridDim.x * gridDim.y);
  const int blocks = a.s / BN;
  const int nb = blocks - 1 - x;  // last key block first
  const int group = a.h / a.kvh;
  const int g = y / a.parts, part = y % a.parts;
  const int heads = group / a.parts;
  const int h0 = g * group + part * heads;
  const int n0 = nb * BN;
  const int m_first = n0 / kBlockM;
  const int tiles = a.s / kBlockM;
  const int per_head = tiles - m_first;
  const int steps = heads * per_head;
  const float log2e = 1.4426950408889634f;
  const float scale_log2 = a.scale * log2e;

  // Loads of step t (query head h, tile m) into buffer t % 2.
  auto load_step = [&](int t) {
    const int h = h0 + t / per_head, m0 = (m_first + t % per_head) * kBlockM;
    const int buf = t & 1;
    const int64_t row = int64_t(b) * a.s + m0;
    load_tile<kBlockM, D, typename C::Q::Layout>(a.q + (row * a.h + h) * D, int64_t(a.h) * D,
                                                  sm.q[buf]);
    load_tile<kBlockM, DV, typename C::dO::Layout>(a.dout + (row * a.h + h) * DV,
                                                    int64_t(a.h) * DV, sm.dout[buf]);
    const int64_t stat = (int64_t(b) * a.h + h) * a.s + m0;
    load_row(a.lse + stat, sm.lse[buf]);
    load_row(a.delta + stat, sm.delta[buf]);
  };

  {
    const int64_t row = int64_t(b) * a.s + n0;
    load_tile<BN, D, typename C::K::Layout>(a.k + (row * a.kvh + g) * D, int64_t(a.kvh) * D, sm.k);
    load_tile<BN, DV, typename C::V::Layout>(a.v + (row * a.kvh + g) * DV, int64_t(a.kvh) * DV,
                                             sm.v);
  }
  load_step(0);
  cp_async_fence();

  Tensor sK = make_tensor(make_smem_ptr(sm.k), typename C::K::Layout{});
  Tensor sKt = make_tensor(make_smem_ptr(sm.k), typename C::K::Transposed{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), typename C::V::Layout{});
  Tensor sPt = make_tensor(make_smem_ptr(sm.pt), typename C::Pt::Layout{});
  Tensor sdSt = make_tensor(make_smem_ptr(sm.dst), typename C::Pt::Layout{});
  Tensor sdS = make_tensor(make_smem_ptr(sm.dst), typename C::Pt::Transposed{});

  typename C::MmaSdP mma_sdp;
  typename C::MmadK mma_dk;
  typename C::MmadV mma_dv;
  typename C::MmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dk = mma_dk.get_thread_slice(tid);
  auto thr_dv = mma_dv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);

  Tensor acc_dk = partition_fragment_C(mma_dk, Shape<Int<BN>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma_dv, Shape<Int<BN>, Int<DV>>{});
  clear(acc_dk);
  clear(acc_dv);

  // (key, query) of each element of Sᵀ's fragment; (query, d) of dQ's.
  Tensor coord_s = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<kBlockM>>{}));
  Tensor coord_dq = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<D>>{}));
  Tensor frag_pt = thr_sdp.partition_C(sPt);
  Tensor frag_dst = thr_sdp.partition_C(sdSt);

  Tensor rK = thr_sdp.partition_fragment_A(sK);
  Tensor rV = thr_sdp.partition_fragment_A(sV);
  Tensor rPt = thr_dv.partition_fragment_A(sPt);
  Tensor rdSt = thr_dk.partition_fragment_A(sdSt);
  Tensor rdS = thr_dq.partition_fragment_A(sdS);
  Tensor rKt = thr_dq.partition_fragment_B(sKt);

  // Step t's dQ part, in key-block order: blocks last_block … 0 of its tile add theirs in turn.
  // Split in three so the staged form can keep the waiting (one thread spinning) out of the
  // window where products are in flight: divergent code there makes ptxas serialise every
  // wgmma of the kernel (warning C7518).
  auto dq_counter = [&](int t) {
    const int h = h0 + t / per_head, mt = m_first + t % per_head;
    return a.counters + (int64_t(b) * a.h + h) * tiles + mt;
  };
  auto dq_turn = [&](int t) {
    const int m0 = (m_first + t % per_head) * kBlockM;
    return (m0 + kBlockM - 1) / BN - nb;  // last_block − nb
  };
  auto dq_add = [&](int t, auto value) {
    const int h = h0 + t / per_head, m0 = (m_first + t % per_head) * kBlockM;
    const int64_t at = (int64_t(b) * a.s + m0) * a.h * D + int64_t(h) * D;
    add_part(value, coord_dq, a.dq_acc + at, a.dq + at, int64_t(a.h) * D, dq_turn(t) == 0,
             nb == 0, a.scale);
  };
  auto add_dq = [&](int t, auto value) {
    wait_turn(dq_counter(t), dq_turn(t));
    dq_add(t, value);
    pass_turn(dq_counter(t), dq_turn(t) + 1);
  };
  auto staged = [&](int i) { return sm.dq_stage[i * kThreads + tid]; };

  for (int t = 0; t < steps; ++t) {
    const int buf = t & 1;
    const int m0 = (m_first + t % per_head) * kBlockM;
    // Step t's tiles arrived, and both warp groups are past step t − 1 (whose products read
    // buffer (t + 1) % 2, Pᵀ and dSᵀ): only then the next step's loads into that buffer.
    cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    if (t + 1 < steps) {
      load_step(t + 1);
      cp_async_fence();
    }

    Tensor sQ = make_tensor(make_smem_ptr(sm.q[buf]), typename C::Q::Layout{});
    Tensor sQt = make_tensor(make_smem_ptr(sm.q[buf]), typename C::Q::Transposed{});
    Tensor sdO = make_tensor(make_smem_ptr(sm.dout[buf]), typename C::dO::Layout{});
    Tensor sdOt = make_tensor(make_smem_ptr(sm.dout[buf]), typename C::dO::Transposed{});

    // Sᵀ and dPᵀ.
    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<kBlockM>>{});
    Tensor rQ = thr_sdp.partition_fragment_B(sQ);
    Tensor rdO = thr_sdp.partition_fragment_B(sdO);
    // Staged: the previous step's dQ part goes out while the tensor cores form Sᵀ and dPᵀ (its
    // turn awaited before they start, handed on after they end).
    if constexpr (Staged) {
      if (t > 0) wait_turn(dq_counter(t - 1), dq_turn(t - 1));
    }
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);
    warpgroup_arrive();
    mma<true>(mma_sdp, rK, rQ, acc_s);
    mma<true>(mma_sdp, rV, rdO, acc_dp);
    warpgroup_commit_batch();
    if constexpr (Staged) {
      if (t > 0) dq_add(t - 1, staged);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);
    if constexpr (Staged) {
      if (t > 0) pass_turn(dq_counter(t - 1), dq_turn(t - 1) + 1);
    }

    // Pᵀ and dSᵀ into shared memory.
    const bool diagonal = n0 + BN - 1 > m0;  // some key after some query
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int kl = get<0>(coord_s(i)), ql = get<1>(coord_s(i));
      float p = exp2f(acc_s(i) * scale_log2 - sm.lse[buf][ql] * log2e);
      if (diagonal && n0 + kl > m0 + ql) p = 0.f;
      frag_pt(i) = Bf16(p);
      frag_dst(i) = Bf16(p * (acc_dp(i) - sm.delta[buf][ql]));
    }
    cutlass::arch::fence_view_async_shared();
    __syncthreads();

    // dV, dK and this key block's part of dQ.
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<D>>{});
    Tensor rdOt = thr_dv.partition_fragment_B(sdOt);
    Tensor rQt = thr_dk.partition_fragment_B(sQt);
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(acc_dq);
    warpgroup_arrive();
    mma<false>(mma_dv, rPt, rdOt, acc_dv);
    mma<false>(mma_dk, rdSt, rQt, acc_dk);
    mma<true>(mma_dq, rdS, rKt, acc_dq);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(acc_dq);

    if constexpr (Staged) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); ++i) sm.dq_stage[i * kThreads + tid] = acc_dq(i);
    } else {
      add_dq(t, [&](int i) { return acc_dq(i); });
    }
  }
  if constexpr (Staged) add_dq(steps - 1, staged);

  // dK (× scale) and dV: written, or added in part order.
  Tensor coord_dk = thr_dk.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  Tensor coord_dv = thr_dv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<DV>>{}));
  const int64_t row = int64_t(b) * a.s + n0;
  const int64_t at_k = (row * a.kvh + g) * D, at_v = (row * a.kvh + g) * DV;
  int *counter = a.counters + int64_t(a.b) * a.h * tiles + (int64_t(b) * a.kvh + g) * tiles + nb;
  if (a.parts > 1) wait_turn(counter, part);
  const bool first = part == 0, last = part == a.parts - 1;
  add_part([&](int i) { return acc_dk(i); }, coord_dk, a.dk_acc + at_k, a.dk + at_k,
           int64_t(a.kvh) * D, first, last, a.scale);
  add_part([&](int i) { return acc_dv(i); }, coord_dv, a.dv_acc + at_v, a.dv + at_v,
           int64_t(a.kvh) * DV, first, last, 1.f);
  if (a.parts > 1) pass_turn(counter, part + 1);
}

// Δ[b, h, s] = Σ_d dO·O over the row's DV values, one warp a row (8 values a lane a pass).
__global__ void attn_delta(const Bf16 *out, const Bf16 *dout, float *delta, int b, int s, int h,
                           int dv) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(b) * s * h) return;
  const Bf16 *o = out + row * dv, *d = dout + row * dv;
  float sum = 0.f;
  for (int c = lane * 8; c < dv; c += 256) {
    const uint4 ov = *reinterpret_cast<const uint4 *>(o + c);
    const uint4 dv8 = *reinterpret_cast<const uint4 *>(d + c);
    const auto *op = reinterpret_cast<const __nv_bfloat162 *>(&ov);
    const auto *dp = reinterpret_cast<const __nv_bfloat162 *>(&dv8);
    for (int j = 0; j < 4; ++j) {
      const float2 x = __bfloat1622float2(op[j]), y = __bfloat1622float2(dp[j]);
      sum += x.x * y.x + x.y * y.y;
    }
  }
  for (int w = 16; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
  if (lane == 0) {
    // row = (b·S + s)·H + h → [b, h, s]
    const int64_t hh = row % h, bs = row / h;
    delta[(bs / s * h + hh) * s + bs % s] = sum;
  }
}

template <int D, int DV, int BN, bool Staged>
int launch_as(const Args &a, cudaStream_t stream) {
  using Smem = typename Config<D, DV, BN, Staged>::Smem;
  const int bytes = int(sizeof(Smem)) + 1024;
  auto kernel = attn_bwd_kernel<D, DV, BN, Staged>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return int(e);
  dim3 grid(a.s / BN, a.kvh * a.parts, a.b);
  kernel<<<grid, kThreads, bytes, stream>>>(a);
  return int(cudaGetLastError());
}

// Whether the staged form's shared memory fits (+ 1,024 for the alignment, + 64 for the
// static variables): not at 256/256.
template <int D, int DV, int BN>
constexpr bool stages() {
  return sizeof(typename Config<D, DV, BN, true>::Smem) + 1024 + 64 <= 227 * 1024;
}

template <int D, int DV, int BN>
int launch(const Args &a, cudaStream_t stream) {
  if constexpr (stages<D, DV, BN>()) {
    if (a.stage) return launch_as<D, DV, BN, true>(a, stream);
  }
  return launch_as<D, DV, BN, false>(a, stream);
}

// The key block of a head configuration; 0 where none is compiled.
int block_of(int d, int dv) {
  if ((d == 64 && dv == 64) || (d == 128 && dv == 128)) return 128;
  if ((d == 192 && dv == 128) || (d == 256 && dv == 256)) return 64;
  return 0;
}

}  // namespace moeq_attn_bwd

using namespace moeq_attn_bwd;

extern "C" {

// Key rows a CTA takes for heads of `d` (queries, keys) and `dv` (values); 0: not served.
int moeq_sm90_attn_bwd_block(int d, int dv) { return block_of(d, dv); }

// Whether `stage` = 1 takes the staged form at these heads (its shared memory fits).
int moeq_sm90_attn_bwd_stages(int d, int dv) {
  switch (block_of(d, dv) == 0 ? 0 : d * 1000 + dv) {
    case 64064: return stages<64, 64, 128>();
    case 128128: return stages<128, 128, 128>();
    case 192128: return stages<192, 128, 64>();
    case 256256: return stages<256, 256, 64>();
    default: return 0;
  }
}

// Zeroes the counters, computes Δ, runs the backward; 0 or a CUDA error code (-1: heads not
// served). The caller checked the shapes (`attn_sm90::serves`): S a multiple of 128, H a
// multiple of KVH·parts, every buffer of its documented size.
int moeq_sm90_attn_bwd(const Args *a, void *stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t counters = size_t(ticket_index(*a)) + 1;
  cudaError_t e = cudaMemsetAsync(a->counters, 0, counters * sizeof(int), stream);
  if (e != cudaSuccess) return int(e);
  const int64_t rows = int64_t(a->b) * a->s * a->h;
  const int per_block = 256 / 32;
  attn_delta<<<unsigned((rows + per_block - 1) / per_block), 256, 0, stream>>>(
      a->out, a->dout, a->delta, a->b, a->s, a->h, a->vd);
  e = cudaGetLastError();
  if (e != cudaSuccess) return int(e);
  switch (block_of(a->hd, a->vd) == 0 ? 0 : a->hd * 1000 + a->vd) {
    case 64064: return launch<64, 64, 128>(*a, stream);
    case 128128: return launch<128, 128, 128>(*a, stream);
    case 192128: return launch<192, 128, 64>(*a, stream);
    case 256256: return launch<256, 256, 64>(*a, stream);
    default: return -1;
  }
}

const char *moeq_sm90_attn_bwd_error(int status) {
  return status < 0 ? "head sizes not compiled" : cudaGetErrorString(cudaError_t(status));
}
}
