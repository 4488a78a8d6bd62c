#include "overlap.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace swa_fast {
namespace {

struct Operand {
  const at::Tensor* tensor;
  const OperandList* list;
  size_t index;
  const void* storage;
};

std::string name_of(const Operand& o) {
  return o.list->indexed ? std::string(o.list->name) + "[" + std::to_string(o.index) + "]" : o.list->name;
}

}  // namespace

void check_no_overlap(const char* op, std::initializer_list<OperandList> lists) {
  std::vector<Operand> operands;
  for (const OperandList& list : lists) {
    for (size_t i = 0; i < list.tensors.size(); ++i) {
      const at::Tensor& t = list.tensors[i];
      if (!t.defined() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || !t.has_storage() ||
          t.numel() == 0) {
        continue;
      }
      operands.push_back({&t, &list, i, t.storage().unsafeGetStorageImpl()});
    }
  }
  std::stable_sort(operands.begin(), operands.end(), [](const Operand& a, const Operand& b) {
    return std::less<const void*>()(a.storage, b.storage);
  });
  for (size_t begin = 0; begin < operands.size();) {
    size_t end = begin + 1;
    while (end < operands.size() && operands[end].storage == operands[begin].storage) {
      ++end;
    }
    for (size_t i = begin; i < end; ++i) {
      for (size_t j = i + 1; j < end; ++j) {
        const Operand& a = operands[i];
        const Operand& b = operands[j];
        if (!a.list->written && !b.list->written) {
          continue;  // two reads may share memory
        }
        const at::MemOverlapStatus status = at::get_overlap_status(*a.tensor, *b.tensor);
        if (status == at::MemOverlapStatus::No) {
          continue;
        }
        const bool same_slot_alias = a.list->elementwise && b.list->elementwise &&
            status == at::MemOverlapStatus::Full && a.index == b.index && a.list->written != b.list->written;
        TORCH_CHECK(
            same_slot_alias, op, ": ", name_of(a), " and ", name_of(b),
            status == at::MemOverlapStatus::TooHard ? " may share memory" : " share memory",
            ", and ", a.list->written && b.list->written ? "both are" : "one is",
            " written; some elements would be read or written through both, giving a wrong or "
            "thread-dependent result. Pass separate tensors (e.g. .clone() one of them)");
      }
    }
    begin = end;
  }
}

}  // namespace swa_fast
