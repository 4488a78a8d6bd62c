#include "inplace.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace swa_fast {
namespace inplace {
namespace {

// Calls f(tensor, argument, position in the list or -1) for every tensor of
// the stack's arguments that the schema marks as written. Nothing is
// allocated: these kernels run on every call (for AveragedModel, every update).
template <typename F>
void for_each_written(const c10::OperatorHandle& op, const torch::jit::Stack& stack, F&& f) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto& alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) {
      continue;
    }
    const c10::IValue& value = stack[first + i];
    if (value.isTensor()) {
      f(value.toTensor(), arguments[i], -1);
    } else if (value.isTensorList()) {
      const auto list = value.toTensorList();
      for (size_t k = 0; k < list.size(); ++k) {
        f(list.get(k), arguments[i], static_cast<int64_t>(k));
      }
    }
  }
}

// "swa_fast.average_: averaged[3]" (built only for an error message).
std::string describe(const c10::OperatorHandle& op, const c10::Argument& argument, int64_t index) {
  std::string name = op.schema().name();  // "swa_fast::average_"
  const auto colons = name.find("::");
  if (colons != std::string::npos) {
    name = name.substr(0, colons) + "." + name.substr(colons + 2);
  }
  return name + ": " + argument.name() + (index >= 0 ? "[" + std::to_string(index) + "]" : "");
}

void autograd_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    for_each_written(op, *stack, [&](const at::Tensor& t, const c10::Argument& argument, int64_t index) {
      if (!t.defined() || !t.requires_grad()) {
        return;
      }
      TORCH_CHECK(
          !t.is_leaf(), describe(op, argument, index),
          " is a leaf Variable that requires grad, which is being used in an in-place operation; call it under "
          "torch.no_grad() (swa_fast's Python API does)");
      TORCH_CHECK(
          false, describe(op, argument, index),
          " requires grad, but the op has no derivative (writing it would leave a wrong gradient); call it under "
          "torch.no_grad() or on a detached tensor");
    });
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void inplace_or_view_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  // The written arguments outlive the redispatch, which pops them off the stack
  // (copies of IValues: reference counts, not tensors).
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<c10::IValue> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto& alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite()) {
      written.push_back((*stack)[first + i]);
    }
  }
  if (!c10::InferenceMode::is_enabled()) {
    for_each_written(op, *stack, [&](const at::Tensor& t, const c10::Argument& argument, int64_t index) {
      TORCH_CHECK(
          !t.defined() || !t.is_inference(), describe(op, argument, index),
          " is an inference tensor; an in-place update to an inference tensor outside InferenceMode is not "
          "allowed (as in torch): clone it first, or call this inside torch.inference_mode()");
    });
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  const auto bump = [](const at::Tensor& t) {
    if (t.defined() && !t.is_inference()) {
      t.unsafeGetTensorImpl()->bump_version();
    }
  };
  for (const c10::IValue& value : written) {
    if (value.isTensor()) {
      bump(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) {
        bump(t);
      }
    }
  }
}

}  // namespace

torch::CppFunction autograd_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&autograd_boxed>();
}

torch::CppFunction inplace_or_view_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&inplace_or_view_boxed>();
}

}  // namespace inplace
}  // namespace swa_fast
