// Refusing calls whose tensors share memory in ways that would give a wrong
// or thread-dependent result, as torch's in-place ops refuse them ("some
// elements of the input tensor and the written-to tensor refer to a single
// memory location"). Shared by the checks of every op that writes in place.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <initializer_list>

namespace swa_fast {

// One named list of an op's tensor arguments, e.g. {"averaged", averaged, true, true}.
struct OperandList {
  const char* name;
  at::TensorList tensors;
  bool written;
  // May alias, exactly, the tensor of the same index in another such list
  // (one written, one read): see check_no_overlap.
  bool elementwise = false;
  // A Tensor[] argument (messages say "name[i]"), or a single Tensor.
  bool indexed = true;
};

// Raises, naming both tensors, when a written tensor shares memory with any
// other tensor of the call. One exception: a written tensor that is exactly
// (same memory, same layout) the read tensor of the same index in another
// list, both marked `elementwise`, e.g. average_(a, a, w): each element is
// read before it is written, by the same thread, so the result is torch's
// (lerp(a, a, w) = a). Pairs are only compared within one storage (sorted by
// storage), so the check costs O(n log n) for n tensors. Tensors with
// symbolic sizes (torch.compile with dynamic shapes) are left out.
void check_no_overlap(const char* op, std::initializer_list<OperandList> lists);

}  // namespace swa_fast
