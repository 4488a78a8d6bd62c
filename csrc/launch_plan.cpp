// The launch planner as plain data, for tests on machines without a GPU
// (the CUDA harness calls plan_launches directly; see launch_plan.h).

#include "launch_plan.h"

#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <utility>

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

template <size_t kArgBytes>
std::vector<PlannedLaunch> describe_depth(const std::vector<int64_t>& numels, int depth) {
  switch (depth) {
    case 1:
      return describe<1, kArgBytes>(numels);
    case 2:
      return describe<2, kArgBytes>(numels);
    case 3:
      return describe<3, kArgBytes>(numels);
    case 4:
      return describe<4, kArgBytes>(numels);
    default:
      TORCH_CHECK(false, "plan_launches: depth must be 1 to ", kMaxDepth, ", got ", depth);
  }
}

template <size_t kArgBytes>
LaunchLimitsInfo limits() {
  using L = LaunchLimits<kArgBytes>;
  return LaunchLimitsInfo{
      kChunkSize,
      L::kMaxBlocks,
      {L::max_tensors(1), L::max_tensors(2), L::max_tensors(3), L::max_tensors(4)},
      {sizeof(TensorListMetadata<1, kArgBytes>), sizeof(TensorListMetadata<2, kArgBytes>),
       sizeof(TensorListMetadata<3, kArgBytes>), sizeof(TensorListMetadata<4, kArgBytes>)}};
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
  return arg_bytes == static_cast<int64_t>(kLargeKernelArgBytes) ? describe_depth<kLargeKernelArgBytes>(numels, depth)
                                                                 : describe_depth<kSmallKernelArgBytes>(numels, depth);
}

LaunchLimitsInfo describe_limits(int64_t arg_bytes) {
  check_budget(arg_bytes);
  return arg_bytes == static_cast<int64_t>(kLargeKernelArgBytes) ? limits<kLargeKernelArgBytes>()
                                                                 : limits<kSmallKernelArgBytes>();
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
      "Chunk size, blocks per launch, tensors per launch by depth (1-4) and metadata bytes for a budget");
}

}  // namespace swa_fast
