// Argument checks and dtype dispatch of the distance op, shared by its CPU and
// CUDA kernels and (through pybind) its fake kernel.
//
// Every check reads metadata only, runs before any work, and names the
// offending index, so a bad call raises with nothing launched and no sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

namespace swa_fast {

// The dtype distance accumulates in and returns its results in: float64 when
// any tensor of `a` or `b` is float64, else float32. Runs every check of the
// op (list lengths, one device, strided floating tensors, equal shapes); `a`
// must not be empty (the results are created on a[0]'s device).
c10::ScalarType validate_distance_args(at::TensorList a, const std::optional<at::TensorList>& b);

// What the kernels walk: every a[i] dense, every b[i] laid out exactly like
// a[i], so each pair is two flat arrays of a[i].numel() elements.
struct DistanceInputs {
  std::vector<at::Tensor> a;
  std::vector<at::Tensor> b;  // empty when the call has no b (norms of a)
  c10::ScalarType acc_dtype;
  c10::Device device;
};

// validate_distance_args, then the dense layouts. A view that is not dense,
// or a b[i] whose layout differs from a[i]'s (a channels_last model against a
// contiguous snapshot), costs one copy here instead of a strided kernel.
DistanceInputs check_distance_args(at::TensorList a, const std::optional<at::TensorList>& b);

// The op's outputs, uninitialized: per-tensor norms [len(a)] and the 0-dim
// total, in the accumulation dtype on the inputs' device.
std::tuple<at::Tensor, at::Tensor> empty_distance_outputs(const DistanceInputs& in);

// ---------------------------------------------------------------------------
// Dtype dispatch
// ---------------------------------------------------------------------------

template <typename T>
struct DistanceType {
  using type = T;
};

namespace distance_detail {

// f(DistanceType<T>{}) for a floating dtype; double only when accumulating in
// double (validate_distance_args makes any double input turn acc to double).
template <typename acc_t, typename F>
void with_input_type(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(DistanceType<float>{});
    case c10::ScalarType::Half:
      return f(DistanceType<c10::Half>{});
    case c10::ScalarType::BFloat16:
      return f(DistanceType<c10::BFloat16>{});
    case c10::ScalarType::Double:
      if constexpr (std::is_same_v<acc_t, double>) {
        return f(DistanceType<double>{});
      }
      break;
    default:
      break;
  }
  TORCH_CHECK(false, "swa_fast.distance: no kernel for ", dtype, " accumulated in ", c10::CppTypeToScalarType<acc_t>::value);
}

template <typename acc_t, typename F>
void with_pair_types(c10::ScalarType a, std::optional<c10::ScalarType> b, F&& f) {
  with_input_type<acc_t>(a, [&](auto a_tag) {
    if (!b.has_value()) {
      return f(DistanceType<acc_t>{}, a_tag, DistanceType<void>{});
    }
    with_input_type<acc_t>(*b, [&](auto b_tag) { f(DistanceType<acc_t>{}, a_tag, b_tag); });
  });
}

}  // namespace distance_detail

// Calls f(DistanceType<acc_t>{}, DistanceType<a_t>{}, DistanceType<b_t>{}) for
// one group of pairs; b_t is void for norms of a alone. Only the combinations
// the checks admit are compiled: 20 with double accumulation (a, b each of
// four dtypes, or b absent), 12 with float (no double input).
template <typename F>
void dispatch_distance_types(c10::ScalarType acc, c10::ScalarType a, std::optional<c10::ScalarType> b, F&& f) {
  if (acc == c10::ScalarType::Double) {
    distance_detail::with_pair_types<double>(a, b, f);
  } else {
    TORCH_CHECK(acc == c10::ScalarType::Float, "swa_fast.distance: accumulation dtype must be float or double, got ", acc);
    distance_detail::with_pair_types<float>(a, b, f);
  }
}

}  // namespace swa_fast
