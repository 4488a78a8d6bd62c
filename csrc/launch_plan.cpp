// The launch planner as plain data, for tests on machines without a GPU
// (the CUDA harness calls plan_launches directly; see launch_plan.h).

#include "launch_plan.h"

#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "bindings.h"

namespace swa_fast {
namespace mta {
namespace {

template <int kDepth, size_t kArgBytes>
std::vector<PlannedLaunch> describe(const std::vector<int64_t>& numels) {
  std::vector<PlannedLaunch> launches;
  plan_launches<kDepth, kArgBytes>(
      numels.size(), [&](size_t t) { return numels[t]; },
      [](int d, size_t t) { return reinterpret_cast<void*>(static_cast<uintptr_t>(fake_address(d, t))); },
      [&](const TensorListMetadata<kDepth, kArgBytes>& meta, int blocks) {
        PlannedLaunch launch{meta.first_chunk_ordinal, {}, {}};
        int slots = 0;
        for (int b = 0; b < blocks; ++b) {
          const int slot = static_cast<int>(meta.block_to_tensor[b]);
          launch.blocks.emplace_back(slot, meta.block_to_chunk[b]);
          slots = std::max(slots, slot + 1);
        }
        for (int s = 0; s < slots; ++s) {
          PlannedSlot slot{meta.tensor_index[s], meta.numel[s], {}};
          for (int d = 0; d < kDepth; ++d) {
            slot.addresses.push_back(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(meta.addresses[d][s])));
          }
          launch.slots.push_back(std::move(slot));
        }
        launches.push_back(std::move(launch));
      });
  return launches;
}

// Depths 1..kMaxDepth, as the compile-time sequence 0..kMaxDepth-1 (depth - 1).
using Depths = std::make_integer_sequence<int, kMaxDepth>;

template <size_t kArgBytes, int... kIndex>
std::vector<PlannedLaunch> describe_depth(
    const std::vector<int64_t>& numels,
    int depth,
    std::integer_sequence<int, kIndex...>) {
  TORCH_CHECK(depth >= 1 && depth <= kMaxDepth, "plan_launches: depth must be 1 to ", kMaxDepth, ", got ", depth);
  std::vector<PlannedLaunch> launches;
  ((depth == kIndex + 1 ? (void)(launches = describe<kIndex + 1, kArgBytes>(numels)) : (void)0), ...);
  return launches;
}

template <size_t kArgBytes, int... kIndex>
LaunchLimitsInfo limits(std::integer_sequence<int, kIndex...>) {
  using L = LaunchLimits<kArgBytes>;
  return LaunchLimitsInfo{
      kChunkSize,
      L::kMaxBlocks,
      {L::max_tensors(kIndex + 1)...},
      {static_cast<int64_t>(sizeof(TensorListMetadata<kIndex + 1, kArgBytes>))...}};
}

void check_budget(int64_t arg_bytes) {
  TORCH_CHECK(
      arg_bytes == static_cast<int64_t>(kSmallKernelArgBytes) || arg_bytes == static_cast<int64_t>(kLargeKernelArgBytes),
      "launch planning: arg_bytes must be ", kSmallKernelArgBytes, " or ", kLargeKernelArgBytes, ", got ", arg_bytes);
}

}  // namespace

uint64_t fake_address(int list, size_t tensor) {
  // Distinct per (list, tensor) and 16-byte aligned, like a real allocation.
  return (static_cast<uint64_t>(list + 1) << 48) | (static_cast<uint64_t>(tensor) << 4);
}

std::vector<PlannedLaunch> describe_launches(const std::vector<int64_t>& numels, int depth, int64_t arg_bytes) {
  check_budget(arg_bytes);
  return arg_bytes == static_cast<int64_t>(kLargeKernelArgBytes)
      ? describe_depth<kLargeKernelArgBytes>(numels, depth, Depths{})
      : describe_depth<kSmallKernelArgBytes>(numels, depth, Depths{});
}

LaunchLimitsInfo describe_limits(int64_t arg_bytes) {
  check_budget(arg_bytes);
  return arg_bytes == static_cast<int64_t>(kLargeKernelArgBytes) ? limits<kLargeKernelArgBytes>(Depths{})
                                                                 : limits<kSmallKernelArgBytes>(Depths{});
}

}  // namespace mta

void bind_launch_plan(pybind11::module_& m) {

  m.def(
      "plan_launches",
      [](const std::vector<int64_t>& numels, int depth, int64_t arg_bytes) {
        pybind11::list launches;
        for (const auto& launch : mta::describe_launches(numels, depth, arg_bytes)) {
          pybind11::list slots;
          for (const auto& slot : launch.slots) {
            slots.append(pybind11::make_tuple(slot.tensor_index, slot.numel, slot.addresses));
          }
          pybind11::dict entry;
          entry["first_chunk_ordinal"] = launch.first_chunk_ordinal;
          entry["slots"] = slots;
          entry["blocks"] = launch.blocks;
          launches.append(entry);
        }
        return launches;
      },
      pybind11::arg("numels"), pybind11::arg("depth"), pybind11::arg("arg_bytes") = mta::kKernelArgBytes,
      "The CUDA harness's launches for tensors of these sizes, as data (for tests): per launch its first chunk "
      "ordinal, its slots (tensor index, numel, one fake address per list) and its blocks (slot, chunk)");
  m.def(
      "fake_address", &mta::fake_address, pybind11::arg("list"), pybind11::arg("tensor"),
      "The address plan_launches gives tensor `tensor` of list `list`");
  m.def(
      "launch_limits",
      [](int64_t arg_bytes) {
        const auto limits = mta::describe_limits(arg_bytes);
        pybind11::dict info;
        info["chunk_size"] = limits.chunk_size;
        info["max_blocks"] = limits.max_blocks;
        info["max_tensors"] = limits.max_tensors;
        info["metadata_bytes"] = limits.metadata_bytes;
        return info;
      },
      pybind11::arg("arg_bytes") = mta::kKernelArgBytes,
      "Chunk size, blocks per launch, tensors per launch by depth (1-9: list i is depth i + 1) and metadata bytes "
      "for a budget");
}

}  // namespace swa_fast
