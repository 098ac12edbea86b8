// Grouped bf16 GEMMs on Hopper (sm_90a): CUTLASS's pointer-array kernel (TMA loads, wgmma,
// warp-specialized producer/consumers, persistent over the tiles of all groups). One launch
// computes every group's D_g = alpha · A_g · B_g with A_g [m, k] row-major and B_g either
// [n, k] row-major ("nt": a token block times a weight stored [out, in]) or [k, n] row-major
// ("nn": the input gradient through that weight). f32 accumulation, bf16 out, no C operand.
//
// Host side (src/ops/grouped_gemm/sm90.rs): `moeq_sm90_grouped_scratch` sizes the device
// scratch for a call of `groups` products; `moeq_sm90_grouped_run` writes the per-group tables
// (shapes, pointers, strides) into it with one host-to-device copy on `stream` and launches.
// docs/ARCHITECTURE.md decision 25 says why and where the cuBLAS path stays.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

using Shapes = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Bf16 = cutlass::bfloat16_t;
constexpr int kAlign = 8;  // 16 bytes of bf16: TMA's alignment for bases and row strides

// One kernel: B's layout, the CTA tile and the schedule.
template <class LayoutB, class Tile, class Cluster, class Mainloop, class EpilogueSchedule>
struct Kernel {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD *, kAlign,
      Bf16, LayoutD *, kAlign, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Bf16, float, void>>::CollectiveOp;
  using Collective = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, LayoutA *, kAlign, Bf16,
      LayoutB *, kAlign, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      Mainloop>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shapes, Collective, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
};

// Candidate configurations (measured with `moeq gpu-bench --experts`, MOEQ_SM90_VARIANT; the
// default, 1, was fastest at 2k–16k tokens: BENCHMARKS.md, "Expert GEMMs on Hopper"):
// 0: 128×128 tiles, two consumer warp groups taking turns (ping-pong), no clusters;
// 1: 128×256 tiles, both consumer warp groups on one tile (cooperative);
// 2: ping-pong 128×128 in clusters of 2 along M (the B tile multicast to both CTAs);
// 3: cooperative 128×128;
// 4: cooperative 128×256 in clusters of 2 along M (the B tile — the experts' weights — multicast
//    to both CTAs: half the weight reads from L2; written 2026-12-05, not measured yet).
using PP = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
using PPEpi = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
using Coop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
template <class LayoutB>
using V0 = Kernel<LayoutB, Shape<_128, _128, _64>, Shape<_1, _1, _1>, PP, PPEpi>;
template <class LayoutB>
using V1 = Kernel<LayoutB, Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>;
template <class LayoutB>
using V2 = Kernel<LayoutB, Shape<_128, _128, _64>, Shape<_2, _1, _1>, PP, PPEpi>;
template <class LayoutB>
using V3 = Kernel<LayoutB, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>;
template <class LayoutB>
using V4 = Kernel<LayoutB, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpi>;

using Nt = cutlass::layout::ColumnMajor;  // B [n, k] row-major = k×n column-major
using Nn = cutlass::layout::RowMajor;     // B [k, n] row-major

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

// The scratch: the per-group tables, then CUTLASS's workspace.
template <class K>
struct Tables {
  size_t shapes, a, b, d, stride_a, stride_b, stride_d, workspace, bytes;

  explicit Tables(int groups) {
    size_t g = size_t(groups), at = 0;
    auto take = [&](size_t bytes) {
      size_t start = at;
      at = align_up(at + bytes);
      return start;
    };
    shapes = take(g * sizeof(typename Shapes::UnderlyingProblemShape));
    a = take(g * sizeof(void *));
    b = take(g * sizeof(void *));
    d = take(g * sizeof(void *));
    stride_a = take(g * sizeof(typename K::StrideA));
    stride_b = take(g * sizeof(typename K::StrideB));
    stride_d = take(g * sizeof(typename K::StrideD));
    workspace = at;
    bytes = at;
  }
};

template <class K>
typename K::Gemm::Arguments arguments(int groups, uint8_t *scratch, const Tables<K> &t,
                                      typename Shapes::UnderlyingProblemShape const *host_shapes,
                                      float alpha, int sm_count) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = sm_count;
  typename K::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, reinterpret_cast<typename Shapes::UnderlyingProblemShape *>(scratch + t.shapes),
       host_shapes},
      {reinterpret_cast<Bf16 const **>(scratch + t.a),
       reinterpret_cast<typename K::StrideA *>(scratch + t.stride_a),
       reinterpret_cast<Bf16 const **>(scratch + t.b),
       reinterpret_cast<typename K::StrideB *>(scratch + t.stride_b)},
      {{},
       nullptr,
       nullptr,
       reinterpret_cast<Bf16 **>(scratch + t.d),
       reinterpret_cast<typename K::StrideD *>(scratch + t.stride_d)},
      hw};
  args.epilogue.thread.alpha = alpha;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

template <class K>
size_t scratch_bytes(int groups, int sm_count) {
  Tables<K> t(groups);
  std::vector<typename Shapes::UnderlyingProblemShape> shapes(size_t(groups),
                                                              cute::make_shape(1, 1, 1));
  auto args = arguments<K>(groups, nullptr, t, shapes.data(), 1.0f, sm_count);
  return t.bytes + align_up(K::Gemm::get_workspace_size(args));
}

// mnk: 3 ints per group; ptrs: A, B, D device addresses per group (3 per group).
template <class K>
int run(int groups, const int32_t *mnk, const uint64_t *ptrs, float alpha, void *scratch,
        size_t scratch_len, int sm_count, cudaStream_t stream) {
  Tables<K> t(groups);
  using Shape3 = typename Shapes::UnderlyingProblemShape;
  std::vector<Shape3> shapes;
  shapes.reserve(size_t(groups));
  std::vector<uint8_t> host(t.workspace, 0);
  auto put = [&](size_t offset, size_t i, auto value) {
    std::memcpy(host.data() + offset + i * sizeof(value), &value, sizeof(value));
  };
  for (int i = 0; i < groups; ++i) {
    int m = mnk[3 * i], n = mnk[3 * i + 1], k = mnk[3 * i + 2];
    shapes.push_back(cute::make_shape(m, n, k));
    put(t.shapes, i, shapes.back());
    put(t.a, i, ptrs[3 * i]);
    put(t.b, i, ptrs[3 * i + 1]);
    put(t.d, i, ptrs[3 * i + 2]);
    put(t.stride_a, i, cutlass::make_cute_packed_stride(typename K::StrideA{}, {m, k, 1}));
    put(t.stride_b, i, cutlass::make_cute_packed_stride(typename K::StrideB{}, {n, k, 1}));
    put(t.stride_d, i, cutlass::make_cute_packed_stride(typename K::StrideD{}, {m, n, 1}));
  }
  auto *base = static_cast<uint8_t *>(scratch);
  auto args = arguments<K>(groups, base, t, shapes.data(), alpha, sm_count);
  size_t workspace = K::Gemm::get_workspace_size(args);
  if (t.workspace + workspace > scratch_len) return -1;
  // Pageable source: the call returns once the bytes are staged, so `host` may go after it.
  if (cudaMemcpyAsync(base, host.data(), host.size(), cudaMemcpyHostToDevice, stream) !=
      cudaSuccess)
    return -2;
  typename K::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -3;
  if (gemm.initialize(args, base + t.workspace, stream) != cutlass::Status::kSuccess) return -4;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return -5;
  return cudaGetLastError() == cudaSuccess ? 0 : -6;
}

// Calls `f.template operator()<K>()` with the kernel of (layout, variant).
template <class F>
auto dispatch(int layout, int variant, F f) {
  switch (variant * 2 + (layout == 0 ? 0 : 1)) {
    case 2: return f.template operator()<V1<Nt>>();
    case 3: return f.template operator()<V1<Nn>>();
    case 4: return f.template operator()<V2<Nt>>();
    case 5: return f.template operator()<V2<Nn>>();
    case 6: return f.template operator()<V3<Nt>>();
    case 7: return f.template operator()<V3<Nn>>();
    case 8: return f.template operator()<V4<Nt>>();
    case 9: return f.template operator()<V4<Nn>>();
    case 1: return f.template operator()<V0<Nn>>();
    default: return f.template operator()<V0<Nt>>();
  }
}

}  // namespace

extern "C" {

// layout: 0 = nt (B [n, k]), 1 = nn (B [k, n]); variant: see the candidates above.
size_t moeq_sm90_grouped_scratch(int layout, int variant, int groups, int sm_count) {
  return dispatch(layout, variant,
                  [&]<class K>() { return scratch_bytes<K>(groups, sm_count); });
}

// 0 on success; negative: -1 scratch too small, -2 copy failed, -3 CUTLASS cannot run these
// shapes, -4 initialisation failed, -5/-6 the launch failed.
int moeq_sm90_grouped_run(int layout, int variant, int groups, const int32_t *mnk,
                          const uint64_t *ptrs, float alpha, void *scratch, size_t scratch_len,
                          int sm_count, void *stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(layout, variant, [&]<class K>() {
    return run<K>(groups, mnk, ptrs, alpha, scratch, scratch_len, sm_count, s);
  });
}

// The last CUDA runtime error as text (for the caller's error message).
const char *moeq_sm90_last_error() { return cudaGetErrorString(cudaPeekAtLastError()); }
}
