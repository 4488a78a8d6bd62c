// How swa_fast's in-place ops (average_, average_moments_,
// ghost_batch_norm_update_stats_) behave toward autograd and inference mode:
// as torch's own in-place ops do. Two boxed kernels serve every such op; they
// find the tensors an op writes from its schema (the `(a!)` arguments), so an
// op opts in with two lines next to its schema (csrc/<op>_args.cpp):
//
//   TORCH_LIBRARY_IMPL(swa_fast, Autograd, m) { m.impl("op_", inplace::autograd_kernel()); }
//   TORCH_LIBRARY_IMPL(swa_fast, ADInplaceOrView, m) { m.impl("op_", inplace::inplace_or_view_kernel()); }
//
// - Autograd: refuse, before anything is written, a written tensor that
//   requires grad while grad mode is on (a leaf, as torch refuses it; any
//   other, because these ops have no derivative and the gradient through them
//   would silently be wrong).
// - ADInplaceOrView (active for every tensor outside inference mode, inference
//   tensors included): refuse a written inference tensor outside inference
//   mode; after the kernel, bump the version counter of every written tensor,
//   so that autograd notices when a tensor it saved for backward was modified
//   ("modified by an inplace operation") instead of computing a wrong
//   gradient.
#pragma once

#include <torch/library.h>

namespace swa_fast {
namespace inplace {

torch::CppFunction autograd_kernel();
torch::CppFunction inplace_or_view_kernel();

}  // namespace inplace
}  // namespace swa_fast
