// The op library and the Python module swa_fast._C.
//
// TORCH_LIBRARY below creates the torch.ops.swa_fast namespace; every op's
// schema is a TORCH_LIBRARY_FRAGMENT next to its checks (csrc/<op>_args.cpp),
// and its kernels register per dispatch key next to their code
// (csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu). The Python module holds the
// build facts that `python -m swa_fast info` and the import-time staleness
// check read, plus what each op binds for its fake kernel (bindings.h).

#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>

#include "bindings.h"
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

// The ops: average_args.cpp (average_, average_moments_, nonfinite_flag),
// ghost_bn_args.cpp (ghost_batch_norm, ghost_batch_norm_backward,
// ghost_batch_norm_update_stats_), distance_args.cpp (distance).
TORCH_LIBRARY(swa_fast, m) {}

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
  swa_fast::bind_average(m);
  swa_fast::bind_ghost_bn(m);
  swa_fast::bind_distance(m);
  swa_fast::bind_launch_plan(m);
}
