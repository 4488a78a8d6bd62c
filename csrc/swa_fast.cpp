// The op library: schemas for torch.ops.swa_fast.* and the build facts that
// `python -m swa_fast info` and the import-time staleness check read.
//
// Kernels register themselves per dispatch key next to their code
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA). The ghost batch norm
// schemas live with their checks in ghost_bn_args.cpp (a library fragment).

#include <torch/extension.h>
#include <torch/library.h>

#include "average_args.h"
#include "ghost_bn_args.h"
#include "distance_args.h"
#include "launch_plan.h"

#ifndef SWA_FAST_SOURCE_HASH
#define SWA_FAST_SOURCE_HASH "unknown"
#endif
#ifndef SWA_FAST_TORCH_VERSION
#define SWA_FAST_TORCH_VERSION "unknown"
#endif
#ifndef SWA_FAST_CPU_CAPABILITY_NAME
#define SWA_FAST_CPU_CAPABILITY_NAME "default"
#endif
#ifndef SWA_FAST_CUDA_ARCHS
#define SWA_FAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(swa_fast, m) {
  // averaged[i] = lerp(averaged[i], current[i], weight) for every i, in place,
  // in one fused pass. weight: 0-dim float32/float64 tensor on the averaged
  // device. weight == 1 is an exact copy. Integer/bool tensors are copied.
  // skip: optional 0-dim bool on the same device; when true nothing changes
  // (read on the device, so the decision costs no host sync).
  m.def("average_(Tensor(a!)[] averaged, Tensor[] current, Tensor weight, Tensor? skip=None) -> ()");
  // SWAG moments in the same pass: mean[i] = lerp(mean[i], x, w) and
  // sq_mean[i] = lerp(sq_mean[i], x*x, w) with x = current[i]. Everything is
  // computed in the arithmetic type (fp32; fp64 for fp64) and rounded once to
  // the moments' dtype at the end; x*x is not rounded to fp16/bf16 first, so
  // for fp16/bf16 moments the result is the fp32 computation rounded once
  // (torch's `sq.lerp_(x * x, w)` in fp16 would round x*x, and overflow it to
  // inf for |x| > 256), and for fp32/fp64 it is exactly torch's.
  m.def(
      "average_moments_(Tensor(a!)[] mean, Tensor(b!)[] sq_mean, Tensor[] current, Tensor weight, "
      "Tensor? skip=None) -> ()");
  // 0-dim bool on the tensors' device: true when any element of any floating
  // tensor is NaN or +-Inf. Pair with the skip argument above.
  m.def("nonfinite_flag(Tensor[] tensors) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["source_hash"] = SWA_FAST_SOURCE_HASH;
  info["torch_version"] = SWA_FAST_TORCH_VERSION;
  info["cpu_capability"] = SWA_FAST_CPU_CAPABILITY_NAME;
#ifdef SWA_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = SWA_FAST_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  // The CUDA launches' kernel-argument budget (launch_plan.h); recorded in
  // CPU builds too, where it only describes what a CUDA build would do.
  info["kernel_arg_bytes"] = static_cast<int64_t>(swa_fast::mta::kKernelArgBytes);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "swa_fast kernels; the ops live in torch.ops.swa_fast";
  m.def("build_info", &build_info, "How this extension was built");
  m.def(
      "is_fusable_pair", &swa_fast::is_fusable_pair, pybind11::arg("averaged"), pybind11::arg("current"),
      "Whether the fused ops take this (averaged, current) pair as it is (dtypes and layout)");
  m.def(
      "validate_average_args",
      [](const std::string& op, const std::vector<at::Tensor>& averaged, const std::vector<at::Tensor>& sq_mean,
         bool with_moments, const std::vector<at::Tensor>& current, const at::Tensor& weight,
         const std::optional<at::Tensor>& skip) {
        swa_fast::validate_average_args(
            op.c_str(), averaged, sq_mean, with_moments, current, weight, skip, /*read_weight_value=*/false);
      },
      "The kernels' argument checks on metadata only (for the fake kernels)");
  m.def(
      "check_nonfinite_args", [](const std::vector<at::Tensor>& tensors) { swa_fast::check_nonfinite_args(tensors); },
      "nonfinite_flag's argument checks (for its fake kernel)");
  m.def(
      "validate_ghost_batch_norm_args",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         int64_t ghost_batch_size, double eps) {
        const auto geometry = swa_fast::validate_ghost_batch_norm_args(input, weight, bias, ghost_batch_size, eps);
        return pybind11::make_tuple(geometry.num_ghosts, geometry.channels);
      },
      "ghost_batch_norm's checks on metadata; returns (num_ghosts, channels) (for the fake kernel)");
  m.def(
      "validate_ghost_batch_norm_backward_args",
      [](const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
         const at::Tensor& mean, const at::Tensor& var, int64_t ghost_batch_size, double eps) {
        swa_fast::validate_ghost_batch_norm_backward_args(grad_output, input, weight, mean, var, ghost_batch_size, eps);
      },
      "ghost_batch_norm_backward's checks on metadata (for the fake kernel)");
  m.def(
      "validate_ghost_update_stats_args",
      [](const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& num_batches_tracked,
         const at::Tensor& mean, const at::Tensor& var, int64_t batch_size, int64_t ghost_batch_size,
         int64_t sample_numel, std::optional<double> momentum) {
        swa_fast::validate_ghost_update_stats_args(
            running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel,
            momentum);
      },
      "ghost_batch_norm_update_stats_'s checks on metadata (for the fake kernel)");
  m.def(
      "plan_launches",
      [](const std::vector<int64_t>& numels, int depth, int64_t arg_bytes) {
        pybind11::list launches;
        for (const auto& launch : swa_fast::mta::describe_launches(numels, depth, arg_bytes)) {
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
      pybind11::arg("numels"), pybind11::arg("depth"), pybind11::arg("arg_bytes") = swa_fast::mta::kKernelArgBytes,
      "The CUDA harness's launches for tensors of these sizes, as data (for tests): per launch its first chunk "
      "ordinal, its slots (tensor index, numel, one fake address per list) and its blocks (slot, chunk)");
  m.def(
      "fake_address", &swa_fast::mta::fake_address, pybind11::arg("list"), pybind11::arg("tensor"),
      "The address plan_launches gives tensor `tensor` of list `list`");
  m.def(
      "launch_limits",
      [](int64_t arg_bytes) {
        const auto limits = swa_fast::mta::describe_limits(arg_bytes);
        pybind11::dict info;
        info["chunk_size"] = limits.chunk_size;
        info["max_blocks"] = limits.max_blocks;
        info["max_tensors"] = limits.max_tensors;
        info["metadata_bytes"] = limits.metadata_bytes;
        return info;
      },
      pybind11::arg("arg_bytes") = swa_fast::mta::kKernelArgBytes,
      "Chunk size, blocks per launch, tensors per launch by depth (1-4) and metadata bytes for a budget");
  m.def(
      "validate_distance_args",
      [](const std::vector<at::Tensor>& a, const std::optional<std::vector<at::Tensor>>& b) {
        const std::optional<at::TensorList> b_list =
            b.has_value() ? std::optional<at::TensorList>(*b) : std::nullopt;
        return std::string(c10::toString(swa_fast::validate_distance_args(a, b_list)));
      },
      pybind11::arg("a"), pybind11::arg("b") = pybind11::none(),
      "distance's argument checks on metadata only; returns the result dtype's name (Float or Double)");
}
