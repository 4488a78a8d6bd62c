// Multi-tensor apply: one kernel launch works on chunks of many tensors.
//
// The design follows PyTorch's ATen/native/cuda/MultiTensorApply.cuh and
// Apex's multi_tensor_apply (no code copied):
//   - the lists are cut into fixed-size chunks of kChunkSize elements, and
//     every CUDA block (kBlockSize threads) handles exactly one chunk;
//   - the tensors' data pointers, element counts and a block -> (tensor,
//     chunk) map travel in the kernel's arguments (TensorListMetadata, passed
//     by value), so a launch needs no device buffer, no host-to-device copy
//     and no sync, and can be captured in a CUDA graph;
//   - the host planner (plan_launches in launch_plan.h: plain C++, tested on
//     the CPU) launches whenever the metadata is full (too many tensors or
//     too many blocks), carrying a tensor whose chunks are not all launched
//     yet into the next launch. The limits follow from the kernel-argument
//     budget chosen at build time (SWA_FAST_KERNEL_ARG_BYTES: 4 KB or 32 KB).
// All launches go on the current stream of the tensors' device.
//
// The harness knows nothing about what a functor computes. A functor is a
// copyable struct with
//     __device__ void operator()(const Chunk<kDepth>& chunk) const;
// called by every thread of a block; its own parameters (scalars, device
// pointers) are data members and travel in the kernel arguments too.
//
// Reductions (e.g. per-tensor L2 norms, deterministically, without float
// atomics) reuse it in two steps:
//   1. workspace = at::empty({count_chunks(lists[0])}, ...) on the device;
//      a functor reduces its chunk within the block and has thread 0 write
//      workspace[chunk.ordinal]. Ordinals number the chunks of one
//      multi_tensor_apply call 0, 1, 2, ... in list order (empty tensors have
//      no chunks), across all of its launches, so each tensor's partials are
//      one contiguous, ordered run of the workspace.
//   2. a second small kernel, one block per tensor, sums its tensor's run in
//      a fixed order (reduce::block_sum, cuda/block_reduce.cuh, reduces
//      within a block in an order fixed by thread indices). The runs' bounds come from chunk_offsets() (host
//      values known before any launch: pass them by value in the kernel
//      arguments, or, for long lists, also write chunk.tensor next to each
//      partial in step 1 and let each block find its run by binary search).
//      Same inputs, same order of additions: bitwise reproducible.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "cuda/block_reduce.cuh"
#include "cuda/vector_access.cuh"
#include "launch_plan.h"

#if SWA_FAST_KERNEL_ARG_BYTES > 4096 && defined(CUDART_VERSION) && CUDART_VERSION < 12010
#error "SWA_FAST_KERNEL_ARG_BYTES=32768 needs CUDA 12.1 or newer (kernel arguments over 4 KB)"
#endif

namespace swa_fast {
namespace mta {

// Chunk size, launch limits, the metadata layout and the planner live in
// launch_plan.h (host code, tested on the CPU); this file adds the device side.
constexpr int kBlockSize = 512;

// In-chunk indices are int: a chunk is far below 2^31 elements (tensor
// offsets, numels and ordinals are int64).
static_assert(kChunkSize <= std::numeric_limits<int>::max() / 16, "chunk indices must fit in int");

// What one block is given: its chunk of the slot's tensor in every list.
template <int kDepth>
struct Chunk {
  void* base[kDepth];  // each list's tensor at element 0
  int64_t begin;       // first element of the chunk within the tensor
  int size;            // elements in the chunk, 1..kChunkSize
  int64_t ordinal;     // position among all chunks of the multi_tensor_apply call
  int tensor;          // index of the tensor in the caller's lists

  // The chunk's first element in list d, typed.
  template <typename T>
  __device__ __forceinline__ T* ptr(int d) const {
    return static_cast<T*>(base[d]) + begin;
  }
};

// ---------------------------------------------------------------------------
// Walking a chunk (vector access itself: cuda/vector_access.cuh)
// ---------------------------------------------------------------------------

// Walks a chunk of `size` elements with the whole block, coalesced: when
// `aligned`, vector_body(v) for every whole vector v (elements v*N..v*N+N-1),
// then scalar_body(i) for the tail; otherwise scalar_body(i) for every i.
template <int N, typename VectorBody, typename ScalarBody>
__device__ __forceinline__ void for_each_in_chunk(
    int size,
    bool aligned,
    const VectorBody& vector_body,
    const ScalarBody& scalar_body) {
  int tail = 0;
  if (aligned) {
    const int vectors = size / N;
    for (int v = threadIdx.x; v < vectors; v += kBlockSize) {
      vector_body(v);
    }
    tail = vectors * N;
  }
  for (int i = tail + threadIdx.x; i < size; i += kBlockSize) {
    scalar_body(i);
  }
}

// A functor that writes per-chunk partials reduces its chunk with
// reduce::block_sum<T, kBlockSize> (cuda/block_reduce.cuh): a fixed order of
// additions, so partials, and everything summed from them, are reproducible.

// ---------------------------------------------------------------------------
// Host side: chunk counts (for workspaces), the budget check and the launches
// ---------------------------------------------------------------------------

// Number of chunk ordinals a call over these tensors uses.
inline int64_t count_chunks(at::TensorList tensors) {
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    total += chunks_in(t.numel());
  }
  return total;
}

// offsets[i]..offsets[i+1] are the ordinals of tensors[i]'s chunks.
inline std::vector<int64_t> chunk_offsets(at::TensorList tensors) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    offsets[i + 1] = offsets[i] + chunks_in(tensors[i].numel());
  }
  return offsets;
}

// A 32 KB build passes kernel arguments over 4 KB, which only a CUDA 12.1+
// driver (530+) on a Volta or newer GPU accepts; on anything else the launch
// would fail with a bare "invalid argument". Checked once per device; a 4 KB
// build runs everywhere and checks nothing.
inline void check_kernel_arg_budget(c10::DeviceIndex device) {
  if constexpr (kKernelArgBytes > kSmallKernelArgBytes) {
    static std::mutex mutex;
    static std::vector<bool> checked;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto index = static_cast<size_t>(device);
    if (checked.size() > index && checked[index]) {
      return;
    }
    int driver = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&driver));
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    TORCH_CHECK(
        driver >= 12010 && major >= 7, "swa_fast was built with SWA_FAST_KERNEL_ARG_BYTES=", kKernelArgBytes,
        ", which needs a CUDA 12.1 or newer driver and a Volta or newer GPU; this is driver ", driver / 1000, ".",
        (driver % 1000) / 10, " with compute capability ", major, ".x. Rebuild with SWA_FAST_KERNEL_ARG_BYTES=4096.");
    if (checked.size() <= index) {
      checked.resize(index + 1, false);
    }
    checked[index] = true;
  }
}

// Kernel and launcher live in an unnamed namespace, as PyTorch's do: a
// template kernel instantiated in several .cu files must not be merged by
// the host linker, since each file registers its own device code.
namespace {

template <int kDepth, typename Functor>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(TensorListMetadata<kDepth> meta, Functor functor) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  Chunk<kDepth> chunk;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    chunk.base[d] = meta.addresses[d][slot];
  }
  chunk.begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[slot] - chunk.begin;
  chunk.size = static_cast<int>(left < kChunkSize ? left : kChunkSize);
  chunk.ordinal = meta.first_chunk_ordinal + blockIdx.x;
  chunk.tensor = meta.tensor_index[slot];
  functor(chunk);
}

// Applies `functor` to every chunk of lists[0][i], ..., lists[kDepth-1][i]
// for all i, in the launches plan_launches (launch_plan.h) packs. All tensors
// of index i must have the same numel and be dense in the same layout (the
// functor walks them as flat arrays); empty tensors are skipped. The first
// `num_written` lists are the ones the functor writes: their pointers come
// from mutable_data_ptr(), the others' from const_data_ptr(), so
// copy-on-write inputs are not materialized. Every launch goes on the
// current stream of the tensors' device.
template <int kDepth, typename Functor>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, int num_written, const Functor& functor) {
  static_assert(
      sizeof(TensorListMetadata<kDepth>) + sizeof(Functor) <= kKernelArgBytes,
      "kernel arguments exceed the budget (SWA_FAST_KERNEL_ARG_BYTES): shrink the functor or the metadata");
  TORCH_CHECK(lists.size() == static_cast<size_t>(kDepth), "multi_tensor_apply: expected ", kDepth, " lists");
  const size_t n = lists[0].size();
  for (const auto& list : lists) {
    TORCH_CHECK(list.size() == n, "multi_tensor_apply: the lists differ in length");
  }
  if (n == 0) {
    return;
  }
  const c10::Device device = lists[0][0].device();
  TORCH_CHECK(device.is_cuda(), "multi_tensor_apply: tensors must be on a CUDA device, got ", device);
  // Every pair is checked before the first launch, so a bad call writes nothing.
  for (size_t t = 0; t < n; ++t) {
    for (int d = 1; d < kDepth; ++d) {
      TORCH_CHECK(
          lists[d][t].numel() == lists[0][t].numel() && lists[d][t].device() == device, "multi_tensor_apply: tensor ",
          t, " of list ", d, " differs in numel or device from list 0");
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  check_kernel_arg_budget(device.index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  plan_launches<kDepth, kKernelArgBytes>(
      n, [&](size_t t) { return lists[0][t].numel(); },
      [&](int d, size_t t) {
        return d < num_written ? lists[d][t].mutable_data_ptr() : const_cast<void*>(lists[d][t].const_data_ptr());
      },
      [&](const TensorListMetadata<kDepth>& meta, int blocks) {
        multi_tensor_apply_kernel<kDepth, Functor><<<blocks, kBlockSize, 0, stream>>>(meta, functor);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace
}  // namespace mta
}  // namespace swa_fast
