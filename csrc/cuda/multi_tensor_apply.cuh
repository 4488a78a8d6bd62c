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
//   - the host loop launches whenever the metadata is full (too many tensors
//     or too many blocks), carrying a tensor whose chunks are not all
//     launched yet into the next launch.
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
//      a fixed order (block_sum below reduces within a block in an order
//      fixed by thread indices). The runs' bounds come from chunk_offsets() (host
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
#include <vector>

namespace swa_fast {
namespace mta {

// 64K elements per block: enough work to hide the launch and the metadata
// reads, few enough that a list of small tensors still spreads over the SMs.
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;

// Kernel arguments are limited to 4 KB before CUDA 12.1 (and on every driver
// that predates it). The counts below keep every metadata struct under that
// with room for the functor; see the static_asserts.
constexpr int kMaxBlocks = 320;
constexpr int kMaxTensorsByDepth[4] = {110, 64, 48, 36};
constexpr size_t kKernelArgBytes = 4096;

// In-chunk indices are int: a chunk is far below 2^31 elements (tensor
// offsets, numels and ordinals are int64).
static_assert(kChunkSize <= std::numeric_limits<int>::max() / 16, "chunk indices must fit in int");

template <int kDepth>
struct TensorListMetadata {
  static_assert(kDepth >= 1 && kDepth <= 4, "multi_tensor_apply supports 1 to 4 lists");
  static constexpr int kMaxTensors = kMaxTensorsByDepth[kDepth - 1];

  // addresses[d][slot]: first element of the slot's tensor in list d.
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  // Ordinal (see the header comment) of this launch's block 0.
  int64_t first_chunk_ordinal;
  // Index of the slot's tensor in the caller's lists.
  int32_t tensor_index[kMaxTensors];
  // Block b works on chunk block_to_chunk[b] of slot block_to_tensor[b].
  int32_t block_to_chunk[kMaxBlocks];
  uint8_t block_to_tensor[kMaxBlocks];
};

static_assert(TensorListMetadata<1>::kMaxTensors <= 255, "slots must fit in block_to_tensor's uint8_t");
static_assert(sizeof(TensorListMetadata<1>) <= kKernelArgBytes - 256, "depth-1 metadata too large");
static_assert(sizeof(TensorListMetadata<2>) <= kKernelArgBytes - 256, "depth-2 metadata too large");
static_assert(sizeof(TensorListMetadata<3>) <= kKernelArgBytes - 256, "depth-3 metadata too large");
static_assert(sizeof(TensorListMetadata<4>) <= kKernelArgBytes - 256, "depth-4 metadata too large");

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
// Vector access helpers for functors
// ---------------------------------------------------------------------------

// 16 bytes is the widest load a thread can issue; it is also what the
// caching allocator's alignment guarantees for a tensor at storage offset 0.
constexpr int kVectorBytes = 16;

// Elements of T per 16-byte vector: the ILP of a vectorized functor.
template <typename T>
constexpr int kVectorWidth = kVectorBytes / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <int kAlignment>
__device__ __forceinline__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kAlignment == 0;
}

// Vector i of p, i.e. elements [i * N, i * N + N); p must be aligned to
// sizeof(T) * N (check with is_aligned first).
template <int N, typename T>
__device__ __forceinline__ AlignedVector<T, N> load_vector(const T* p, int i) {
  return reinterpret_cast<const AlignedVector<T, N>*>(p)[i];
}

template <int N, typename T>
__device__ __forceinline__ void store_vector(T* p, int i, const AlignedVector<T, N>& v) {
  reinterpret_cast<AlignedVector<T, N>*>(p)[i] = v;
}

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

// ---------------------------------------------------------------------------
// Deterministic block reduction for functors that write per-chunk partials
// ---------------------------------------------------------------------------

constexpr int kWarpSize = 32;

// Sum of `value` over the kThreads threads of a block, in an order fixed by
// the thread indices alone (a shuffle tree per warp, then a shuffle tree over
// the warp sums in warp 0): the same inputs give the same bits, with no
// atomics. Every thread of the block must call it; the result is valid in
// thread 0. Uses static shared memory: a kernel that calls it twice must
// __syncthreads() between the calls.
template <typename T, int kThreads = kBlockSize>
__device__ __forceinline__ T block_sum(T value) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "one warp must hold all warp sums");
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ T warp_sums[kWarps];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// ---------------------------------------------------------------------------
// Host side: chunk counts (for workspaces) and the launch loop
// ---------------------------------------------------------------------------

inline int64_t chunks_in(int64_t numel) {
  return (numel + kChunkSize - 1) / kChunkSize;
}

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

template <int kDepth, typename Functor>
void launch(const TensorListMetadata<kDepth>& meta, int blocks, const Functor& functor, cudaStream_t stream) {
  multi_tensor_apply_kernel<kDepth, Functor><<<blocks, kBlockSize, 0, stream>>>(meta, functor);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Applies `functor` to every chunk of lists[0][i], ..., lists[kDepth-1][i]
// for all i. All tensors of index i must have the same numel and be dense in
// the same layout (the functor walks them as flat arrays); empty tensors are
// skipped. The first `num_written` lists are the ones the functor writes:
// their pointers come from mutable_data_ptr(), the others' from
// const_data_ptr(), so copy-on-write inputs are not materialized.
template <int kDepth, typename Functor>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, int num_written, const Functor& functor) {
  static_assert(
      sizeof(TensorListMetadata<kDepth>) + sizeof(Functor) <= kKernelArgBytes,
      "kernel arguments exceed 4 KB: shrink the functor or the metadata");
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
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  constexpr int kMaxTensors = TensorListMetadata<kDepth>::kMaxTensors;
  TensorListMetadata<kDepth> meta{};
  meta.first_chunk_ordinal = 0;
  int tensors = 0;  // slots filled in this launch
  int blocks = 0;   // blocks filled in this launch
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = lists[0][t].numel();
    for (int d = 0; d < kDepth; ++d) {
      const at::Tensor& tensor = lists[d][t];
      TORCH_CHECK(
          tensor.numel() == numel && tensor.device() == device,
          "multi_tensor_apply: tensor ", t, " of list ", d, " differs in numel or device from list 0");
    }
    if (numel == 0) {
      continue;
    }
    const int64_t chunks = chunks_in(numel);
    TORCH_CHECK(
        chunks <= std::numeric_limits<int32_t>::max(), "multi_tensor_apply: tensor ", t, " has too many elements (",
        numel, ")");
    for (int d = 0; d < kDepth; ++d) {
      meta.addresses[d][tensors] =
          d < num_written ? lists[d][t].mutable_data_ptr() : const_cast<void*>(lists[d][t].const_data_ptr());
    }
    meta.numel[tensors] = numel;
    meta.tensor_index[tensors] = static_cast<int32_t>(t);
    ++tensors;

    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_to_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      // A slot is free again only once all its chunks have been launched.
      const bool tensors_full = tensors == kMaxTensors && last_chunk;
      const bool blocks_full = blocks == kMaxBlocks;
      if (!tensors_full && !blocks_full) {
        continue;
      }
      launch(meta, blocks, functor, stream);
      meta.first_chunk_ordinal += blocks;
      blocks = 0;
      if (last_chunk) {
        tensors = 0;
      } else {
        // The current tensor has chunks left: it becomes slot 0 of the next
        // launch (block_to_chunk keeps counting its chunks).
        for (int d = 0; d < kDepth; ++d) {
          meta.addresses[d][0] = meta.addresses[d][tensors - 1];
        }
        meta.numel[0] = meta.numel[tensors - 1];
        meta.tensor_index[0] = meta.tensor_index[tensors - 1];
        tensors = 1;
      }
    }
  }
  if (blocks > 0) {
    launch(meta, blocks, functor, stream);
  }
}

}  // namespace
}  // namespace mta
}  // namespace swa_fast
