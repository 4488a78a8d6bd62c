// Grouping a call's tensor pairs by dtype combination, host side: each group
// becomes one multi_tensor_apply call (one kernel instantiation), in the order
// its first pair appears. Shared by the averaging and distance CUDA kernels;
// the CPU kernels need no groups (they dispatch per chunk).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace swa_fast {

template <typename Key>
struct TensorGroup {
  Key key;                                     // the dtypes that pick the kernel
  std::vector<std::vector<at::Tensor>> lists;  // lists[d][k]: list d's tensor of the group's pair k
  std::vector<int64_t> index;                  // pair k's position in the caller's lists
};

// Appends pair `position` (one tensor per list, in list order) to the group of
// `key`, creating the group when it is new.
template <typename Key>
void add_to_group(std::vector<TensorGroup<Key>>& groups, const Key& key, int64_t position, at::TensorList tensors) {
  TensorGroup<Key>* group = nullptr;
  for (TensorGroup<Key>& g : groups) {
    if (g.key == key) {
      group = &g;
      break;
    }
  }
  if (group == nullptr) {
    groups.push_back(TensorGroup<Key>{key, std::vector<std::vector<at::Tensor>>(tensors.size()), {}});
    group = &groups.back();
  }
  size_t d = 0;
  for (const at::Tensor& t : tensors) {
    group->lists[d++].push_back(t);
  }
  group->index.push_back(position);
}

}  // namespace swa_fast
