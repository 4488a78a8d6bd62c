// Deterministic warp and block reductions for the CUDA kernels: the order in
// which values are combined is fixed by the thread indices alone (a shuffle
// tree per warp, then a shuffle tree over the warp results in warp 0), so the
// same inputs give the same bits on every run, with no atomics.
//
// A reduction is described by an Op struct with
//   using Acc = ...;                                   (a plain struct or scalar)
//   static __device__ Acc identity();
//   static __device__ Acc merge(const Acc& a, const Acc& b);   (a: the lower-indexed side)
//   static __device__ Acc shfl_down(const Acc& a, int offset);
// SumOp below is the plain sum; ghost batch norm's statistics use Welford
// moments and its backward a pair of sums (cuda/ghost_bn_reduce.cuh).
#pragma once

namespace swa_fast {
namespace reduce {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename Op>
__device__ __forceinline__ typename Op::Acc warp_reduce(typename Op::Acc acc) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    acc = Op::merge(acc, Op::shfl_down(acc, offset));
  }
  return acc;
}

// The merged accumulator of a 1-D block's blockDim.x threads (whole warps,
// at most 32 of them), valid in thread 0. Every thread must call it.
// warp_results: shared memory for blockDim.x / 32 accumulators. Ends with a
// barrier, so the caller may reuse warp_results right away.
template <typename Op>
__device__ __forceinline__ typename Op::Acc block_reduce(typename Op::Acc acc, typename Op::Acc* warp_results) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  acc = warp_reduce<Op>(acc);
  if (lane == 0) {
    warp_results[warp] = acc;
  }
  __syncthreads();
  if (warp == 0) {
    acc = lane < warps ? warp_results[lane] : Op::identity();
    acc = warp_reduce<Op>(acc);
  }
  __syncthreads();
  return acc;
}

template <typename T>
struct SumOp {
  using Acc = T;
  static __device__ __forceinline__ T identity() {
    return T(0);
  }
  static __device__ __forceinline__ T merge(const T& a, const T& b) {
    return a + b;
  }
  static __device__ __forceinline__ T shfl_down(const T& a, int offset) {
    return __shfl_down_sync(kFullMask, a, offset);
  }
};

// Sum of `value` over a block of exactly kThreads threads; valid in thread 0.
template <typename T, int kThreads>
__device__ __forceinline__ T block_sum(T value) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "one warp must hold all warp sums");
  __shared__ T warp_sums[kThreads / kWarpSize];
  return block_reduce<SumOp<T>>(value, warp_sums);
}

}  // namespace reduce
}  // namespace swa_fast
