// CUDA kernel of distance.
//
// Structure (mirrors csrc/cpu/distance_cpu.cpp section by section):
//   1. check_distance_args validates everything on the host and lays every
//      b[i] out like a[i];
//   2. the pairs are grouped by (a dtype, b dtype) and each group goes through
//      multi_tensor_apply (multi_tensor_apply.cuh): one CUDA block per
//      64k-element chunk, SumOfSquaresFunctor<acc_t, a_t, b_t> writes the
//      chunk's sum of squared differences to its slot of a partials
//      workspace (group g's chunks at base_g + chunk ordinal);
//   3. sum_runs_kernel, one block per tensor, sums each tensor's run of
//      partials in a fixed order; finish_kernel, one block, sums the
//      per-tensor sums in a fixed order and takes the square roots.
//
// Determinism: no float atomics anywhere. Each thread's elements and order
// depend only on the chunk size (not on pointer alignment: the unaligned path
// reads the same elements per thread as the vector path), and every
// cross-thread sum is reduce::block_sum's fixed tree, so the same inputs give the
// same bits on every call. Nothing is read on the host: no sync, and the
// results are valid when the stream reaches them.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/tensor_groups.h"
#include "rounding.h"  // fma_rn: one rounding per accumulated square
#include "distance_args.h"

namespace swa_fast {
namespace {

// ---------------------------------------------------------------------------
// One chunk's sum of squares (CPU: chunk_sum_of_squares)
// ---------------------------------------------------------------------------

// Elements per thread step: a 16-byte load of the wider input type (and the
// matching narrower load of the other), e.g. 4 for fp32, 8 for bf16 alone.
template <typename a_t, typename b_t>
constexpr int distance_ilp() {
  if constexpr (std::is_void_v<b_t>) {
    return vec::kVectorWidth<a_t>;
  } else {
    return vec::kVectorWidth<a_t> < vec::kVectorWidth<b_t> ? vec::kVectorWidth<a_t> : vec::kVectorWidth<b_t>;
  }
}

// Lists: {a} for norms, {a, b} for distances. Writes partials[chunk.ordinal].
template <typename acc_t, typename a_t, typename b_t>
struct SumOfSquaresFunctor {
  static constexpr bool kPair = !std::is_void_v<b_t>;
  static constexpr int kDepth = kPair ? 2 : 1;
  static constexpr int kILP = distance_ilp<a_t, b_t>();
  // b's element type when present; a_t stands in (never read) for norms.
  using other_t = std::conditional_t<kPair, b_t, a_t>;

  acc_t* partials;  // this group's run of the workspace

  __device__ __forceinline__ void operator()(const mta::Chunk<kDepth>& chunk) const {
    const a_t* a = chunk.template ptr<const a_t>(0);
    const other_t* b = kPair ? chunk.template ptr<const other_t>(kDepth - 1) : nullptr;
    const bool aligned =
        vec::is_aligned<kILP * sizeof(a_t)>(a) && (!kPair || vec::is_aligned<kILP * sizeof(other_t)>(b));

    // sum + d * d with d = x - y (d = x for norms), in acc_t.
    const auto add_square = [&](acc_t sum, int i) {
      acc_t d = static_cast<acc_t>(a[i]);
      if constexpr (kPair) {
        d -= static_cast<acc_t>(b[i]);
      }
      return fma_rn(d, d, sum);
    };

    // Thread t takes steps t, t + kBlockSize, ... of kILP elements each, then
    // tail elements one by one: the same elements in the same order whether
    // or not the pointers allow vector loads.
    acc_t sum = 0;
    const int steps = chunk.size / kILP;
    if (aligned) {
#pragma unroll 4
      for (int v = threadIdx.x; v < steps; v += mta::kBlockSize) {
        const auto x = vec::load_vector<kILP>(a, v);
        if constexpr (kPair) {
          const auto y = vec::load_vector<kILP>(b, v);
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            const acc_t d = static_cast<acc_t>(x.val[k]) - static_cast<acc_t>(y.val[k]);
            sum = fma_rn(d, d, sum);
          }
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            const acc_t d = static_cast<acc_t>(x.val[k]);
            sum = fma_rn(d, d, sum);
          }
        }
      }
    } else {
      for (int v = threadIdx.x; v < steps; v += mta::kBlockSize) {
#pragma unroll
        for (int k = 0; k < kILP; ++k) {
          sum = add_square(sum, v * kILP + k);
        }
      }
    }
    for (int i = steps * kILP + threadIdx.x; i < chunk.size; i += mta::kBlockSize) {
      sum = add_square(sum, i);
    }
    sum = reduce::block_sum<acc_t, mta::kBlockSize>(sum);
    if (threadIdx.x == 0) {
      partials[chunk.ordinal] = sum;
    }
  }
};

// ---------------------------------------------------------------------------
// Per-tensor and total reductions (CPU: the loops at the end of distance_impl)
// ---------------------------------------------------------------------------

// Tensor first_tensor + k owns partials [start[k], start[k] + count[k]). The
// runs travel in the kernel arguments (no host-to-device copy, no sync), as
// many as the kernel-argument budget holds beside the two pointers, with a
// margin (nvcc allows 32764 bytes, not 32768, under the 32 KB budget): 503 at
// 4 KB, 4087 at 32 KB. A longer list takes several launches.
constexpr size_t kRunsArgMargin = 64;
constexpr int kRunsPerLaunch =
    static_cast<int>((mta::kKernelArgBytes - kRunsArgMargin - sizeof(int64_t)) / (2 * sizeof(int32_t)));

struct TensorRuns {
  int64_t first_tensor;
  int32_t start[kRunsPerLaunch];
  int32_t count[kRunsPerLaunch];
};
static_assert(sizeof(TensorRuns) + 2 * sizeof(void*) <= mta::kKernelArgBytes, "runs exceed the kernel arguments");

// Block k: sums[first_tensor + k] = sum of tensor first_tensor + k's partials.
template <typename acc_t>
__global__ void __launch_bounds__(mta::kBlockSize)
    sum_runs_kernel(const acc_t* partials, TensorRuns runs, acc_t* sums) {
  const int32_t start = runs.start[blockIdx.x];
  const int32_t count = runs.count[blockIdx.x];
  acc_t sum = 0;
  for (int32_t i = threadIdx.x; i < count; i += mta::kBlockSize) {
    sum += partials[start + i];
  }
  sum = reduce::block_sum<acc_t, mta::kBlockSize>(sum);
  if (threadIdx.x == 0) {
    sums[runs.first_tensor + blockIdx.x] = sum;
  }
}

// One block: total = sqrt(sum of the n per-tensor sums), then every per-tensor
// sum becomes its square root in place. Each thread rewrites only the entries
// it read, so the in-place update needs no extra barrier.
template <typename acc_t>
__global__ void __launch_bounds__(mta::kBlockSize) finish_kernel(acc_t* per_tensor, int64_t n, acc_t* total) {
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += mta::kBlockSize) {
    sum += per_tensor[i];
  }
  sum = reduce::block_sum<acc_t, mta::kBlockSize>(sum);
  if (threadIdx.x == 0) {
    *total = sqrt(sum);
  }
  for (int64_t i = threadIdx.x; i < n; i += mta::kBlockSize) {
    per_tensor[i] = sqrt(per_tensor[i]);
  }
}

// ---------------------------------------------------------------------------
// Grouping by dtype pair and dispatch (CPU: split_into_chunks, run_chunk)
// ---------------------------------------------------------------------------

// One launch group: (a dtype, b dtype or none for norms of a alone).
using Group = TensorGroup<std::pair<at::ScalarType, std::optional<at::ScalarType>>>;

// `partials`: this group's run of the workspace.
template <typename acc_t>
void run_group(const Group& group, c10::ScalarType acc_dtype, acc_t* partials) {
  dispatch_distance_types(acc_dtype, group.key.first, group.key.second, [&](auto acc_tag, auto a_tag, auto b_tag) {
    using a_t = typename decltype(a_tag)::type;
    using b_t = typename decltype(b_tag)::type;
    // The dispatch instantiates both accumulation types; only acc_t runs.
    if constexpr (std::is_same_v<typename decltype(acc_tag)::type, acc_t>) {
      using Functor = SumOfSquaresFunctor<acc_t, a_t, b_t>;
      mta::multi_tensor_apply<Functor::kDepth>(group.lists, 0, Functor{partials});
    } else {
      TORCH_INTERNAL_ASSERT(false, "swa_fast.distance: accumulation dtype mismatch");
    }
  });
}

// ---------------------------------------------------------------------------
// distance (CPU: distance_cpu)
// ---------------------------------------------------------------------------

template <typename acc_t>
void distance_impl(const DistanceInputs& in, at::Tensor& per_tensor, at::Tensor& total) {
  const bool pair = !in.b.empty();
  const int64_t n = static_cast<int64_t>(in.a.size());
  std::vector<Group> groups;
  for (int64_t i = 0; i < n; ++i) {
    if (pair) {
      add_to_group(groups, std::make_pair(in.a[i].scalar_type(), std::optional(in.b[i].scalar_type())), i,
                   {in.a[i], in.b[i]});
    } else {
      add_to_group(groups, std::make_pair(in.a[i].scalar_type(), std::optional<at::ScalarType>()), i, {in.a[i]});
    }
  }

  // Lay the groups' partials end to end; a tensor's chunks are one contiguous
  // run within its group (ordinals follow list order).
  std::vector<int32_t> start(n, 0);
  std::vector<int32_t> count(n, 0);
  std::vector<int64_t> base(groups.size(), 0);  // each group's first partial
  int64_t total_chunks = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const Group& group = groups[g];
    base[g] = total_chunks;
    const std::vector<int64_t> offsets = mta::chunk_offsets(group.lists[0]);
    for (size_t k = 0; k < group.index.size(); ++k) {
      const int64_t first = base[g] + offsets[k];
      TORCH_CHECK(
          first + (offsets[k + 1] - offsets[k]) <= std::numeric_limits<int32_t>::max(),
          "swa_fast.distance: too many elements for the partials workspace");
      start[group.index[k]] = static_cast<int32_t>(first);
      count[group.index[k]] = static_cast<int32_t>(offsets[k + 1] - offsets[k]);
    }
    total_chunks += offsets.back();
  }
  at::Tensor partials = at::empty({total_chunks}, per_tensor.options());
  acc_t* partials_ptr = partials.mutable_data_ptr<acc_t>();
  for (size_t g = 0; g < groups.size(); ++g) {
    run_group<acc_t>(groups[g], in.acc_dtype, partials_ptr + base[g]);
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(in.device.index()).stream();
  acc_t* sums = per_tensor.mutable_data_ptr<acc_t>();
  for (int64_t first = 0; first < n; first += kRunsPerLaunch) {
    const int blocks = static_cast<int>(std::min<int64_t>(kRunsPerLaunch, n - first));
    TensorRuns runs{};
    runs.first_tensor = first;
    std::copy(start.begin() + first, start.begin() + first + blocks, runs.start);
    std::copy(count.begin() + first, count.begin() + first + blocks, runs.count);
    sum_runs_kernel<acc_t><<<blocks, mta::kBlockSize, 0, stream>>>(partials_ptr, runs, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_kernel<acc_t><<<1, mta::kBlockSize, 0, stream>>>(sums, n, total.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The workspace goes back to the caching allocator now; the stream order
  // keeps its next user behind these kernels.
}

std::tuple<at::Tensor, at::Tensor> distance_cuda(at::TensorList a, const std::optional<at::TensorList>& b) {
  const DistanceInputs in = check_distance_args(a, b);
  const c10::cuda::CUDAGuard guard(in.device);
  auto [per_tensor, total] = empty_distance_outputs(in);
  if (in.acc_dtype == c10::ScalarType::Double) {
    distance_impl<double>(in, per_tensor, total);
  } else {
    distance_impl<float>(in, per_tensor, total);
  }
  return {per_tensor, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) {
  m.impl("distance", &distance_cuda);
}

}  // namespace swa_fast
