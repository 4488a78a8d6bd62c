// Host-side planning of multi-tensor launches: which chunks of which tensors
// each launch of one multi_tensor_apply call works on, packed into the
// metadata its kernel receives by value.
//
// Plain C++ (no CUDA, no ATen tensors): the CUDA harness
// (cuda/multi_tensor_apply.cuh) launches exactly what plan_launches packs, and
// the CPU build compiles it too (launch_plan.cpp), so tests/test_launch_plan.py
// checks every plan on a machine without a GPU, sizes over 2^31 elements
// included (as numbers: nothing is allocated).
//
// The plan:
//   - every tensor is cut into chunks of kChunkSize elements (the last one
//     shorter); one CUDA block works on one chunk;
//   - a launch holds up to max_tensors(depth) tensors ("slots") and
//     kMaxBlocks chunks; the planner fills both in list order and launches
//     when either is full;
//   - a tensor whose chunks do not all fit is carried: it becomes slot 0 of
//     the next launch and its chunks continue there;
//   - empty tensors take no slot and no chunk;
//   - chunk ordinals number the chunks of the whole call 0, 1, 2, ... in list
//     order across all of its launches (first_chunk_ordinal + block index),
//     so a reduction can write one partial per chunk and sum each tensor's
//     contiguous run of partials in a fixed order.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// Kernel-argument budget of the CUDA launches, chosen at build time
// (SWA_FAST_KERNEL_ARG_BYTES=4096|32768, see setup.py). 4 KB is what every
// CUDA version and driver allows; 32 KB needs CUDA >= 12.1 at build and run
// time and a Volta or newer GPU (torch's foreach kernels use it there), and
// lets one launch carry about ten times as many tensors and six times as many
// chunks. The harness refuses a 32 KB build on a driver that lacks it.
#ifndef SWA_FAST_KERNEL_ARG_BYTES
#define SWA_FAST_KERNEL_ARG_BYTES 4096
#endif

namespace swa_fast {
namespace mta {

// 64K elements per block: enough work to hide the launch and the metadata
// reads, few enough that a list of small tensors still spreads over the SMs.
constexpr int64_t kChunkSize = 65536;

constexpr size_t kSmallKernelArgBytes = 4096;
constexpr size_t kLargeKernelArgBytes = 32768;
constexpr size_t kKernelArgBytes = SWA_FAST_KERNEL_ARG_BYTES;
static_assert(
    kKernelArgBytes == kSmallKernelArgBytes || kKernelArgBytes == kLargeKernelArgBytes,
    "SWA_FAST_KERNEL_ARG_BYTES must be 4096 or 32768");

// Kernel-argument bytes left to the functor beside the metadata (its weight
// and skip pointers, a workspace pointer: 40 bytes at most today). It also keeps the
// total under what nvcc really allows at 32 KB (32764 bytes).
constexpr size_t kFunctorArgBytes = 128;

// The most lists one call walks: multi_average_'s up to 8 averages of each
// tensor plus the current list (average_moments_ walks 3: mean, sq_mean,
// current). Each slot of a launch carries one address per list, so deeper
// launches hold fewer tensors.
constexpr int kMaxDepth = 9;

// Launch limits for one kernel-argument budget. The block count is fixed
// (torch's and Apex's 320 at 4 KB; 2048 at 32 KB, 128M elements a launch);
// the tensors per launch are then as many as the rest of the budget holds,
// which depends on the depth (each slot carries one address per list).
template <size_t kArgBytes>
struct LaunchLimits {
  static constexpr bool kLarge = kArgBytes >= kLargeKernelArgBytes;
  static constexpr int kMaxBlocks = kLarge ? 2048 : 320;
  // Slot index of each block: one byte while slots fit in it.
  using slot_t = std::conditional_t<kLarge, uint16_t, uint8_t>;

  static constexpr int max_tensors(int depth) {
    // TensorListMetadata's fields: per slot `depth` addresses, a numel and a
    // tensor index; per block a chunk index and a slot; one ordinal; at most
    // 7 bytes of tail padding.
    const size_t fixed = sizeof(int64_t) + kMaxBlocks * (sizeof(int32_t) + sizeof(slot_t)) + 7;
    const size_t per_slot = depth * sizeof(void*) + sizeof(int64_t) + sizeof(int32_t);
    const size_t fit = (kArgBytes - kFunctorArgBytes - fixed) / per_slot;
    const size_t slot_limit = static_cast<size_t>(std::numeric_limits<slot_t>::max()) + 1;
    return static_cast<int>(fit < slot_limit ? fit : slot_limit);
  }
};

// What the kernel of one launch receives by value: the slots' addresses in
// every list, their element counts and indices in the caller's lists, and
// for each block the (slot, chunk) it works on.
template <int kDepth, size_t kArgBytes = kKernelArgBytes>
struct TensorListMetadata {
  static_assert(kDepth >= 1 && kDepth <= kMaxDepth, "multi_tensor_apply supports 1 to kMaxDepth (9) lists");
  using Limits = LaunchLimits<kArgBytes>;
  using slot_t = typename Limits::slot_t;
  static constexpr int kMaxTensors = Limits::max_tensors(kDepth);
  static constexpr int kMaxBlocks = Limits::kMaxBlocks;

  // addresses[d][slot]: first element of the slot's tensor in list d.
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  // Ordinal (see the header comment) of this launch's block 0.
  int64_t first_chunk_ordinal;
  // Index of the slot's tensor in the caller's lists.
  int32_t tensor_index[kMaxTensors];
  // Block b works on chunk block_to_chunk[b] of slot block_to_tensor[b].
  int32_t block_to_chunk[kMaxBlocks];
  slot_t block_to_tensor[kMaxBlocks];
};

static_assert(sizeof(TensorListMetadata<1, kSmallKernelArgBytes>) <= kSmallKernelArgBytes - kFunctorArgBytes);
static_assert(sizeof(TensorListMetadata<kMaxDepth, kSmallKernelArgBytes>) <= kSmallKernelArgBytes - kFunctorArgBytes);
static_assert(sizeof(TensorListMetadata<1, kLargeKernelArgBytes>) <= kLargeKernelArgBytes - kFunctorArgBytes);
static_assert(sizeof(TensorListMetadata<kMaxDepth, kLargeKernelArgBytes>) <= kLargeKernelArgBytes - kFunctorArgBytes);
static_assert(LaunchLimits<kSmallKernelArgBytes>::max_tensors(kMaxDepth) >= 1, "the deepest launch must hold a tensor");

inline int64_t chunks_in(int64_t numel) {
  return (numel + kChunkSize - 1) / kChunkSize;
}

// Packs the chunks of n tensors into launches and calls
// launch(const TensorListMetadata<kDepth, kArgBytes>& meta, int blocks) for
// each, in order. numel(t) gives tensor t's element count (the same in every
// list), address(d, t) its first element in list d. Tensors with more than
// 2^31 - 1 chunks are refused before any launch.
template <int kDepth, size_t kArgBytes, typename NumelFn, typename AddressFn, typename LaunchFn>
void plan_launches(size_t n, const NumelFn& numel, const AddressFn& address, const LaunchFn& launch) {
  using Meta = TensorListMetadata<kDepth, kArgBytes>;
  for (size_t t = 0; t < n; ++t) {
    TORCH_CHECK(numel(t) >= 0, "multi_tensor_apply: tensor ", t, " has a negative element count");
    TORCH_CHECK(
        chunks_in(numel(t)) <= std::numeric_limits<int32_t>::max(), "multi_tensor_apply: tensor ", t,
        " has too many elements (", numel(t), ")");
  }
  Meta meta{};
  meta.first_chunk_ordinal = 0;
  int tensors = 0;  // slots filled in this launch
  int blocks = 0;   // blocks filled in this launch
  for (size_t t = 0; t < n; ++t) {
    const int64_t count = numel(t);
    if (count == 0) {
      continue;
    }
    for (int d = 0; d < kDepth; ++d) {
      meta.addresses[d][tensors] = address(d, t);
    }
    meta.numel[tensors] = count;
    meta.tensor_index[tensors] = static_cast<int32_t>(t);
    ++tensors;

    const int64_t chunks = chunks_in(count);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_to_tensor[blocks] = static_cast<typename Meta::slot_t>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      // A slot is free again only once all its chunks have been launched.
      const bool tensors_full = tensors == Meta::kMaxTensors && last_chunk;
      const bool blocks_full = blocks == Meta::kMaxBlocks;
      if (!tensors_full && !blocks_full) {
        continue;
      }
      launch(static_cast<const Meta&>(meta), blocks);
      meta.first_chunk_ordinal += blocks;
      blocks = 0;
      if (last_chunk) {
        tensors = 0;
      } else {
        // The tensor has chunks left: it becomes slot 0 of the next launch
        // (block_to_chunk keeps counting its chunks).
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
    launch(static_cast<const Meta&>(meta), blocks);
  }
}

// ---------------------------------------------------------------------------
// For tests: the plans and limits as plain data (launch_plan.cpp; exposed as
// swa_fast._C.plan_launches and swa_fast._C.launch_limits)
// ---------------------------------------------------------------------------

struct PlannedSlot {
  int32_t tensor_index;
  int64_t numel;
  std::vector<uint64_t> addresses;  // one per list
};

struct PlannedLaunch {
  int64_t first_chunk_ordinal;
  std::vector<PlannedSlot> slots;                 // the slots the launch's blocks use, in slot order
  std::vector<std::pair<int, int32_t>> blocks;    // (slot, chunk) per block
};

// The launches of a call over tensors with these element counts, for lists of
// `depth` (1 to kMaxDepth) and a kernel-argument budget of arg_bytes (4096 or 32768).
// Tensor t's address in list d is the fake value fake_address(d, t), never
// dereferenced.
std::vector<PlannedLaunch> describe_launches(const std::vector<int64_t>& numels, int depth, int64_t arg_bytes);

uint64_t fake_address(int list, size_t tensor);

struct LaunchLimitsInfo {
  int64_t chunk_size;
  int max_blocks;
  std::vector<int> max_tensors;       // by depth 1..kMaxDepth
  std::vector<int64_t> metadata_bytes;  // sizeof(TensorListMetadata) by depth 1..kMaxDepth
};

LaunchLimitsInfo describe_limits(int64_t arg_bytes);

}  // namespace mta
}  // namespace swa_fast
