// Argument checks and dtype dispatch of the distance op, shared by its CPU and
// CUDA kernels and (through pybind) its fake kernel.
//
// Every check reads metadata only, runs before any work, and names the
// offending index, so a bad call raises with nothing launched and no sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "dtypes.h"

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

// Calls f(TypeTag<acc_t>{}, TypeTag<a_t>{}, TypeTag<b_t>{}) for one group of
// pairs; b_t is void for norms of a alone. Only the combinations the checks
// admit are compiled: 20 with double accumulation (a, b each of four dtypes,
// or b absent), 12 with float (no double input: validate_distance_args makes
// any double input accumulate in double).
template <typename F>
void dispatch_distance_types(c10::ScalarType acc, c10::ScalarType a, std::optional<c10::ScalarType> b, F&& f) {
  constexpr const char* kOp = "swa_fast.distance";
  TORCH_CHECK(
      acc == c10::ScalarType::Float || acc == c10::ScalarType::Double, kOp,
      ": accumulation dtype must be float or double, got ", acc);
  dispatch_kernel_float(kOp, acc, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    // fp32 accumulation never sees a double input; half types never accumulate.
    const auto input = [&](c10::ScalarType dtype, auto&& g) {
      dispatch_kernel_float(kOp, dtype, [&](auto tag) {
        using t = typename decltype(tag)::type;
        if constexpr (float_rank_of<acc_t>() >= 2 && float_rank_of<t>() <= float_rank_of<acc_t>()) {
          g(tag);
        } else {
          TORCH_CHECK(false, kOp, ": no kernel for ", dtype, " accumulated in ", acc);
        }
      });
    };
    if constexpr (float_rank_of<acc_t>() >= 2) {
      input(a, [&](auto a_tag) {
        if (!b.has_value()) {
          f(acc_tag, a_tag, TypeTag<void>{});
        } else {
          input(*b, [&](auto b_tag) { f(acc_tag, a_tag, b_tag); });
        }
      });
    } else {
      TORCH_CHECK(false, kOp, ": accumulation dtype must be float or double, got ", acc);
    }
  });
}

}  // namespace swa_fast
