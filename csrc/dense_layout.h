// Memory-order comparison shared by the ops' argument checks.
#pragma once

#include <ATen/core/Tensor.h>

namespace swa_fast {

// True when `b` (of a's shape) is dense and walks memory in a's order: the
// strides agree on every dimension with more than one element. A size-1
// dimension's stride never addresses anything, so a channels_last 1x1 conv
// weight and its contiguous copy, whose strides differ only there, are the
// same two flat arrays and need no copy.
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (!b.is_non_overlapping_and_dense()) {
    return false;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

}  // namespace swa_fast
