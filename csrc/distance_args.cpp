#include "distance_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "bindings.h"
#include "dense_layout.h"
#include "dtypes.h"

namespace swa_fast {

TORCH_LIBRARY_FRAGMENT(swa_fast, m) {
  // L2 norms of a[i] - b[i] (of a[i] when b is None) for every i, and of the
  // whole list, in one pass over the data. Accumulated in float32, or float64
  // when any input is float64; both results have that dtype and a[0]'s device.
  // The reduction order is fixed (per-chunk partial sums, reduced per tensor
  // in chunk order, then over tensors), so the same inputs give the same bits
  // on every call, whatever the thread count. No host sync.
  m.def("distance(Tensor[] a, Tensor[]? b=None) -> (Tensor per_tensor, Tensor total)");
}

namespace {

constexpr const char* kOp = "swa_fast.distance";

void check_tensor(const at::Tensor& t, const char* list, size_t i, c10::Device device) {
  TORCH_CHECK(t.defined(), kOp, ": ", list, "[", i, "] is an undefined tensor");
  TORCH_CHECK(
      t.device() == device, kOp, ": ", list, "[", i, "] is on ", t.device(), " but a[0] is on ", device,
      "; all tensors of one call must be on one device");
  TORCH_CHECK(
      t.layout() == c10::kStrided, kOp, ": ", list, "[", i, "] has layout ", t.layout(),
      "; distance takes strided (dense) tensors");
  TORCH_CHECK(
      is_kernel_float(t.scalar_type()), kOp, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
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

void bind_distance(pybind11::module_& m) {
  m.def(
      "validate_distance_args",
      [](const std::vector<at::Tensor>& a, const std::optional<std::vector<at::Tensor>>& b) {
        const std::optional<at::TensorList> b_list = b.has_value() ? std::optional<at::TensorList>(*b) : std::nullopt;
        return std::string(c10::toString(validate_distance_args(a, b_list)));
      },
      pybind11::arg("a"), pybind11::arg("b") = pybind11::none(),
      "distance's argument checks on metadata only; returns the result dtype's name (Float or Double)");
}

}  // namespace swa_fast
