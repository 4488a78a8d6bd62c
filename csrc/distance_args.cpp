#include "distance_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include "dense_layout.h"

namespace swa_fast {
namespace {

constexpr const char* kOp = "swa_fast.distance";

bool is_supported_input_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double || t == c10::ScalarType::Half ||
      t == c10::ScalarType::BFloat16;
}

void check_tensor(const at::Tensor& t, const char* list, size_t i, c10::Device device) {
  TORCH_CHECK(t.defined(), kOp, ": ", list, "[", i, "] is an undefined tensor");
  TORCH_CHECK(
      t.device() == device, kOp, ": ", list, "[", i, "] is on ", t.device(), " but a[0] is on ", device,
      "; all tensors of one call must be on one device");
  TORCH_CHECK(
      t.layout() == c10::kStrided, kOp, ": ", list, "[", i, "] has layout ", t.layout(),
      "; distance takes strided (dense) tensors");
  TORCH_CHECK(
      is_supported_input_dtype(t.scalar_type()), kOp, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
      "; distance takes floating tensors (float16, bfloat16, float32, float64)");
}

}  // namespace

c10::ScalarType validate_distance_args(at::TensorList a, const std::optional<at::TensorList>& b) {
  TORCH_CHECK(
      !a.empty(), kOp, ": a is an empty list; pass at least one tensor (the results are created on a[0]'s device)");
  if (b.has_value()) {
    TORCH_CHECK(b->size() == a.size(), kOp, ": a has ", a.size(), " tensors but b has ", b->size());
  }
  const c10::Device device = a[0].device();
  bool any_double = false;
  for (size_t i = 0; i < a.size(); ++i) {
    check_tensor(a[i], "a", i, device);
    any_double |= a[i].scalar_type() == c10::ScalarType::Double;
    if (!b.has_value()) {
      continue;
    }
    const at::Tensor& other = (*b)[i];
    check_tensor(other, "b", i, device);
    any_double |= other.scalar_type() == c10::ScalarType::Double;
    TORCH_CHECK(
        a[i].sizes() == other.sizes(), kOp, ": shape mismatch at index ", i, ": a[", i, "] has shape ", a[i].sizes(),
        " but b[", i, "] has shape ", other.sizes());
  }
  return any_double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

DistanceInputs check_distance_args(at::TensorList a, const std::optional<at::TensorList>& b) {
  const c10::ScalarType acc_dtype = validate_distance_args(a, b);
  DistanceInputs inputs{{}, {}, acc_dtype, a[0].device()};
  inputs.a.reserve(a.size());
  for (const at::Tensor& t : a) {
    inputs.a.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  if (!b.has_value()) {
    return inputs;
  }
  inputs.b.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& dense_a = inputs.a[i];
    const at::Tensor& other = (*b)[i];
    if (same_dense_layout(dense_a, other)) {
      inputs.b.push_back(other);
    } else {
      at::Tensor copy = at::empty_strided(dense_a.sizes(), dense_a.strides(), other.options());
      copy.copy_(other);
      inputs.b.push_back(std::move(copy));
    }
  }
  return inputs;
}

std::tuple<at::Tensor, at::Tensor> empty_distance_outputs(const DistanceInputs& in) {
  const at::TensorOptions options = at::TensorOptions().dtype(in.acc_dtype).device(in.device);
  return {at::empty({static_cast<int64_t>(in.a.size())}, options), at::empty({}, options)};
}

}  // namespace swa_fast
