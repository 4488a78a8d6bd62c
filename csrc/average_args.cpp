#include "average_args.h"

#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <ATen/ops/empty_strided.h>
#include <ATen/ops/view_as_real.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "dense_layout.h"
#include "dtypes.h"
#include "inplace.h"
#include "overlap.h"

namespace swa_fast {

TORCH_LIBRARY_FRAGMENT(swa_fast, m) {
  // averaged[i] = lerp(averaged[i], current[i], weight) for every i, in place,
  // in one fused pass. weight: 0-dim float32/float64 tensor on the averaged
  // device. weight == 1 is an exact copy. Integer/bool tensors are copied.
  // skip: optional 0-dim bool on the same device; when true nothing changes
  // (read on the device, so the decision costs no host sync).
  m.def("average_(Tensor(a!)[] averaged, Tensor[] current, Tensor weight, Tensor? skip=None) -> ()");
  // K averages of the same tensors from one read of them: with K = weights.numel() and
  // N = len(current), averaged is K lists of N tensors, flat and k-major, and
  // averaged[k * N + i] = lerp(averaged[k * N + i], current[i], weights[k]) with exactly
  // average_'s arithmetic (average k is bitwise what average_(list k, current, weights[k])
  // gives). weights: 1-D float32/float64 on the averaged device, read there. Every average
  // of current[i] matches averaged[i] in shape, strides, dtype and device. skip as above.
  m.def("multi_average_(Tensor(a!)[] averaged, Tensor[] current, Tensor weights, Tensor? skip=None) -> ()");
  // SWAG moments in the same pass: mean[i] = lerp(mean[i], x, w) and
  // sq_mean[i] = lerp(sq_mean[i], x*x, w) with x = current[i]. Everything is
  // computed in the arithmetic type (fp32; fp64 for fp64) and rounded once to
  // the moments' dtype at the end; x*x is not rounded to fp16/bf16 first, so
  // for fp16/bf16 moments the result is the fp32 computation rounded once
  // (torch's `sq.lerp_(x * x, w)` in fp16 would round x*x, and overflow it to
  // inf for |x| > 256), and for fp32/fp64 it is exactly torch's.
  m.def(
      "average_moments_(Tensor(a!)[] mean, Tensor(b!)[] sq_mean, Tensor[] current, Tensor weight, "
      "Tensor? skip=None) -> ()");
  // SWAG's collection step (Maddox et al. 2019) with a centred variance, in one
  // pass over current: for every element, in the arithmetic type T (fp64 for
  // fp64 averages, else fp32), with x = current, m = mean, v = variance and
  // w = weight,
  //     d     = x - m
  //     m'    = lerp(m, x, w)        exactly average_'s (bitwise average_(mean, current, w))
  //     v'    = (1 - w) * fma(w * d, d, v)
  //     dev   = x - m'
  // each rounded in T (w * d too; the fma once; 1 - w once), then each result
  // rounded once to the averages' dtype: mean <- m', variance <- v',
  // deviation <- dev. The recurrence is Welford's, weighted: for w = 1/(n+1)
  // it is the exact population-variance update of n+1 values,
  // var_{n+1} = (1-w)(var_n + w d^2) (Welford: S_{n+1} = S_n + d (x - m') with
  // S = n var and x - m' = (1-w) d), and for any w in [0, 1] it is the
  // exponentially weighted variance recurrence (West 1979; Finch 2009,
  // "Incremental calculation of weighted mean and variance"). It never forms
  // E[x^2] - E[x]^2, whose cancellation loses every digit of a small spread
  // around a large mean in fp32 (average_moments_'s second moment). Since
  // w * d * d >= 0, the variance stays >= 0 given a variance >= 0. With
  // w == 1 (the first collection) the mean is average_'s exact copy of x and,
  // for finite values, variance = 0 and deviation = 0 (the old buffers must be
  // finite: 0 * NaN is NaN). deviation: one tensor per mean tensor, or an
  // empty list (diagonal SWAG: no deviation written); variance[i] and
  // deviation[i] match mean[i] in shape, strides, dtype and device (deviation
  // columns may be non-overlapping views of one ring buffer). mean: fp16,
  // bf16, fp32 or fp64 (integer, bool and complex tensors are refused);
  // current: its dtype or a lower-precision floating one. weight and skip as
  // for average_.
  m.def(
      "swag_moments_(Tensor(a!)[] mean, Tensor(b!)[] variance, Tensor(c!)[] deviation, Tensor[] current, "
      "Tensor weight, Tensor? skip=None) -> ()");
  // average_ with stochastic rounding of float16/bfloat16 averages (timm's
  // bf16 EMA): the lerp is computed exactly as average_ computes it, in float32
  // (weight == 1: current's value itself), and the float32 result r is rounded
  // to the average's 16-bit dtype stochastically: to the neighbour above r
  // with probability (r - lo) / (hi - lo), else to the one below, so the
  // rounded average equals r in expectation exactly (csrc/stochastic_rounding.h).
  // Tiny updates (1 - decay far below the 16-bit spacing) then accumulate in
  // expectation instead of rounding away. The random bits are counter-based:
  // a function of (seed, counter, tensor, element), where `counter` is a 0-dim
  // int64 tensor on the averaged device read there (pass the number of updates
  // so far, e.g. n_averaged, so that each update draws new bits and a resumed
  // run draws the same ones), and `tensor` is the pair's position among the
  // pairs of its (averaged dtype, current dtype) in the call: the same bits on
  // the CPU and on CUDA, for any thread count. float32/float64 averages are
  // updated exactly as average_ updates them (nothing random); integer/bool
  // tensors are copied. Pairs: a float16/bfloat16 average takes a float16,
  // bfloat16 or float32 current (a float32 model into a bf16 EMA, the memory
  // saving this exists for); float32/float64 averages as for average_.
  // weight and skip as for average_.
  m.def(
      "average_stochastic_(Tensor(a!)[] averaged, Tensor[] current, Tensor weight, Tensor counter, int seed, "
      "Tensor? skip=None) -> ()");
  // 0-dim bool on the tensors' device: true when any element of any floating
  // tensor is NaN or +-Inf. Pair with the skip argument above.
  m.def("nonfinite_flag(Tensor[] tensors) -> Tensor");
}

// The in-place ops follow torch's in-place rules (inplace.h).
TORCH_LIBRARY_IMPL(swa_fast, Autograd, m) {
  m.impl("average_", inplace::autograd_kernel());
  m.impl("multi_average_", inplace::autograd_kernel());
  m.impl("average_moments_", inplace::autograd_kernel());
  m.impl("swag_moments_", inplace::autograd_kernel());
  m.impl("average_stochastic_", inplace::autograd_kernel());
}

TORCH_LIBRARY_IMPL(swa_fast, ADInplaceOrView, m) {
  m.impl("average_", inplace::inplace_or_view_kernel());
  m.impl("multi_average_", inplace::inplace_or_view_kernel());
  m.impl("average_moments_", inplace::inplace_or_view_kernel());
  m.impl("swag_moments_", inplace::inplace_or_view_kernel());
  m.impl("average_stochastic_", inplace::inplace_or_view_kernel());
}

namespace {

// `first` names the list whose tensor 0 set the device ("averaged"; "mean" for swag_moments_).
void check_same_device(
    const char* op,
    const at::Tensor& t,
    const char* list,
    size_t i,
    c10::Device device,
    const char* first = "averaged") {
  TORCH_CHECK(
      t.device() == device, op, ": ", list, "[", i, "] is on ", t.device(), " but ", first, "[0] is on ", device,
      "; all tensors of one call must be on one device");
}

void check_weight_dtype(const char* op, const char* name, const at::Tensor& weight) {
  TORCH_CHECK(
      weight.scalar_type() == c10::ScalarType::Float || weight.scalar_type() == c10::ScalarType::Double, op, ": ",
      name, " must be float32 or float64, got ", weight.scalar_type());
}

// The device, and on the CPU the range of every value. Reading a CPU tensor
// is free; a device one would cost a sync, so the range of device weights is
// the caller's promise (the Python API checks Python floats before they
// become tensors).
void check_weight_device_and_range(
    const char* op,
    const char* name,
    const at::Tensor& weight,
    c10::Device device,
    bool read_value) {
  TORCH_CHECK(
      weight.device() == device, op, ": ", name, " is on ", weight.device(), " but the averaged tensors are on ",
      device, "; create it there (e.g. torch.tensor(w, device=...))");
  if (read_value && weight.is_cpu()) {
    const std::vector<double> values = read_weights(weight);
    for (size_t k = 0; k < values.size(); ++k) {
      TORCH_CHECK(
          values[k] >= 0.0 && values[k] <= 1.0, op, ": ", name, weight.dim() == 0 ? "" : "[" + std::to_string(k) + "]",
          " must be in [0, 1], got ", values[k]);
    }
  }
}

void check_weight(const char* op, const at::Tensor& weight, c10::Device device, bool read_value) {
  TORCH_CHECK(weight.dim() == 0, op, ": weight must be a 0-dim tensor, got shape ", weight.sizes());
  check_weight_dtype(op, "weight", weight);
  check_weight_device_and_range(op, "weight", weight, device, read_value);
}

void check_skip(const char* op, const std::optional<at::Tensor>& skip, c10::Device device) {
  if (!skip.has_value()) {
    return;
  }
  TORCH_CHECK(
      skip->dim() == 0 && skip->scalar_type() == c10::ScalarType::Bool, op,
      ": skip must be a 0-dim bool tensor, got dtype ", skip->scalar_type(), " and shape ", skip->sizes());
  TORCH_CHECK(
      skip->device() == device, op, ": skip is on ", skip->device(), " but the averaged tensors are on ", device);
}

// The checks of one (averaged[i], current[i]) pair, shared by every averaging op.
// `name` is the averaged list's argument name ("mean" for swag_moments_).
void check_pair(
    const char* op,
    const at::Tensor& avg,
    const at::Tensor& cur,
    size_t i,
    c10::Device device,
    const char* name = "averaged",
    bool stochastic = false) {
  check_same_device(op, avg, name, i, device, name);
  check_same_device(op, cur, "current", i, device, name);
  TORCH_CHECK(
      avg.sizes() == cur.sizes(), op, ": shape mismatch at index ", i, ": ", name, "[", i, "] has shape ",
      avg.sizes(), " but current[", i, "] has shape ", cur.sizes());
  TORCH_CHECK(
      !at::isComplexType(avg.scalar_type()), op, ": ", name, "[", i, "] is complex (", avg.scalar_type(),
      "), which swa_fast does not average");
  TORCH_CHECK(
      has_average_kernel(avg.scalar_type()) && has_average_kernel(cur.scalar_type()), op, ": ", name, "[", i,
      "] is ", avg.scalar_type(), " and current[", i, "] is ", cur.scalar_type(),
      "; swa_fast averages float16, bfloat16, float32 and float64 tensors and copies integer and bool ones "
      "(AveragedModel sends other dtypes through torch's own lerp)");
  const bool avg_floating = at::isFloatingType(avg.scalar_type());
  TORCH_CHECK(
      avg_floating || !at::isFloatingType(cur.scalar_type()), op, ": ", name, "[", i, "] has non-floating dtype ",
      avg.scalar_type(), " but current[", i, "] is ", cur.scalar_type(),
      "; a running average needs a floating averaged tensor (integer/bool tensors are only copied, "
      "from a tensor of the same dtype)");
  if (stochastic) {
    TORCH_CHECK(
        is_stochastic_dtype_pair(avg.scalar_type(), cur.scalar_type()), op, ": ", name, "[", i, "] has dtype ",
        avg.scalar_type(), " but current[", i, "] has dtype ", cur.scalar_type(),
        "; a float16/bfloat16 average takes a float16, bfloat16 or float32 current, a float32/float64 one its "
        "own dtype or a lower-precision floating one");
  } else {
    TORCH_CHECK(
        is_supported_dtype_pair(avg.scalar_type(), cur.scalar_type()), op, ": ", name, "[", i, "] has dtype ",
        avg.scalar_type(), " but current[", i, "] has dtype ", cur.scalar_type(),
        "; current must have the averaged dtype or a lower-precision floating dtype");
  }
  TORCH_CHECK(
      avg.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
      "] is a strided view (not dense); averages must be whole tensors, e.g. parameters or .contiguous() copies");
}

// swag_moments_ averages floating parameters only: `list`[i] must have a
// kernel float dtype (float16, bfloat16, float32, float64).
void check_swag_floating(const char* op, const char* list, const at::Tensor& t, size_t i) {
  TORCH_CHECK(
      is_kernel_float(t.scalar_type()), op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
      "; SWAG averages floating parameters only: mean, variance, deviation and current must be float16, "
      "bfloat16, float32 or float64 (leave integer, bool and complex tensors, e.g. BatchNorm's "
      "num_batches_tracked, out of the lists)");
}

// variance[i] / deviation[i] (`list`) against mean[i]: same device, shape, strides and dtype.
void check_like_mean(
    const char* op,
    const char* list,
    const at::Tensor& t,
    const at::Tensor& mean,
    size_t i,
    c10::Device device) {
  check_same_device(op, t, list, i, device, "mean");
  TORCH_CHECK(
      t.sizes() == mean.sizes() && t.strides() == mean.strides() && t.scalar_type() == mean.scalar_type(), op, ": ",
      list, "[", i, "] has shape ", t.sizes(), ", strides ", t.strides(), " and dtype ", t.scalar_type(), " but mean[",
      i, "] has shape ", mean.sizes(), ", strides ", mean.strides(), " and dtype ", mean.scalar_type(), "; ", list,
      "[", i, "] must match mean[", i, "] in shape, strides, dtype and device");
}

}  // namespace

bool has_average_kernel(c10::ScalarType dtype) {
  // float8/float4 count as floating types in c10 but have no lerp here (nor
  // in torch): routing them to the fallback gives torch's own behaviour.
  return float_rank(dtype) > 0 || at::isIntegralType(dtype, /*includeBool=*/true);
}

bool is_supported_dtype_pair(c10::ScalarType averaged, c10::ScalarType current) {
  if (!has_average_kernel(averaged) || !has_average_kernel(current)) {
    return false;
  }
  if (averaged == current) {
    return true;
  }
  const int avg_rank = float_rank(averaged);
  const int cur_rank = float_rank(current);
  return avg_rank >= 2 && cur_rank > 0 && cur_rank < avg_rank;
}

bool is_stochastic_dtype_pair(c10::ScalarType averaged, c10::ScalarType current) {
  if (is_reduced_float(averaged)) {
    return is_reduced_float(current) || current == c10::ScalarType::Float;
  }
  return is_supported_dtype_pair(averaged, current);
}

bool is_fusable_pair(const at::Tensor& averaged, const at::Tensor& current) {
  return is_supported_dtype_pair(averaged.scalar_type(), current.scalar_type()) && averaged.is_non_overlapping_and_dense();
}

void validate_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList sq_mean,
    bool with_moments,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value) {
  TORCH_CHECK(
      averaged.size() == current.size(), op, ": averaged has ", averaged.size(), " tensors but current has ",
      current.size());
  if (with_moments) {
    TORCH_CHECK(
        sq_mean.size() == averaged.size(), op, ": mean has ", averaged.size(), " tensors but sq_mean has ",
        sq_mean.size());
  }
  if (averaged.empty()) {
    return;  // an empty update is a no-op, not an error
  }
  const c10::Device device = averaged[0].device();
  check_weight(op, weight, device, read_weight_value);
  check_skip(op, skip, device);

  for (size_t i = 0; i < averaged.size(); ++i) {
    const at::Tensor& avg = averaged[i];
    check_pair(op, avg, current[i], i, device);
    if (with_moments) {
      const at::Tensor& sq = sq_mean[i];
      TORCH_CHECK(
          at::isFloatingType(avg.scalar_type()), op, ": mean[", i, "] has dtype ", avg.scalar_type(),
          "; moments need floating tensors");
      check_same_device(op, sq, "sq_mean", i, device);
      TORCH_CHECK(
          sq.sizes() == avg.sizes() && sq.strides() == avg.strides() && sq.scalar_type() == avg.scalar_type(), op,
          ": sq_mean[", i, "] must match mean[", i, "] in shape, strides and dtype; got shape ", sq.sizes(),
          " and dtype ", sq.scalar_type(), " for mean's ", avg.sizes(), " and ", avg.scalar_type());
    }
  }
  // No written tensor may share memory with another tensor of the call (the
  // weight and skip flags included: every block reads them), except
  // averaged[i] being current[i] itself in average_ (lerp(a, a, w) = a).
  // Moments refuse even that: torch's two lerps in sequence would see mean's
  // new values in x * x, the fused pass its old ones.
  const at::TensorList skip_list = skip.has_value() ? at::TensorList(*skip) : at::TensorList();
  if (with_moments) {
    check_no_overlap(
        op, {{"mean", averaged, true}, {"sq_mean", sq_mean, true}, {"current", current, false},
             {"weight", weight, false, false, false}, {"skip", skip_list, false, false, false}});
  } else {
    check_no_overlap(
        op, {{"averaged", averaged, true, true}, {"current", current, false, true},
             {"weight", weight, false, false, false}, {"skip", skip_list, false, false, false}});
  }
}

void validate_stochastic_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const at::Tensor& counter,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value) {
  TORCH_CHECK(
      averaged.size() == current.size(), op, ": averaged has ", averaged.size(), " tensors but current has ",
      current.size());
  if (averaged.empty()) {
    return;  // an empty update is a no-op, not an error
  }
  const c10::Device device = averaged[0].device();
  check_weight(op, weight, device, read_weight_value);
  check_skip(op, skip, device);
  TORCH_CHECK(
      counter.dim() == 0 && counter.scalar_type() == c10::ScalarType::Long, op,
      ": counter must be a 0-dim int64 tensor (the number of updates so far), got dtype ", counter.scalar_type(),
      " and shape ", counter.sizes());
  TORCH_CHECK(
      counter.device() == device, op, ": counter is on ", counter.device(), " but the averaged tensors are on ",
      device, "; keep it with the averages (it is read there, without a sync)");
  for (size_t i = 0; i < averaged.size(); ++i) {
    check_pair(op, averaged[i], current[i], i, device, "averaged", /*stochastic=*/true);
  }
  // As average_: averaged[i] may be current[i] itself (lerp(a, a, w) = a, which
  // rounds to itself); nothing else written may share memory with what is read.
  const at::TensorList skip_list = skip.has_value() ? at::TensorList(*skip) : at::TensorList();
  check_no_overlap(
      op, {{"averaged", averaged, true, true}, {"current", current, false, true},
           {"weight", weight, false, false, false}, {"counter", counter, false, false, false},
           {"skip", skip_list, false, false, false}});
}

void validate_swag_args(
    const char* op,
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value) {
  TORCH_CHECK(
      mean.size() == current.size(), op, ": mean has ", mean.size(), " tensors but current has ", current.size());
  TORCH_CHECK(
      variance.size() == mean.size(), op, ": mean has ", mean.size(), " tensors but variance has ",
      variance.size());
  TORCH_CHECK(
      deviation.empty() || deviation.size() == mean.size(), op, ": mean has ", mean.size(),
      " tensors but deviation has ", deviation.size(),
      "; pass one deviation tensor per mean tensor, or an empty list (no deviation written)");
  if (mean.empty()) {
    return;  // an empty update is a no-op, not an error
  }
  const c10::Device device = mean[0].device();
  check_weight(op, weight, device, read_weight_value);
  check_skip(op, skip, device);
  for (size_t i = 0; i < mean.size(); ++i) {
    check_swag_floating(op, "mean", mean[i], i);
    check_swag_floating(op, "current", current[i], i);
    check_pair(op, mean[i], current[i], i, device, "mean");
    check_like_mean(op, "variance", variance[i], mean[i], i, device);
    if (!deviation.empty()) {
      check_like_mean(op, "deviation", deviation[i], mean[i], i, device);
    }
  }
  // No written tensor may share memory with another tensor of the call, the
  // weight and skip flags included; unlike average_, not even mean[i] being
  // current[i] (as for average_moments_: nothing written is read). Views of
  // one storage (a ring buffer's deviation columns) are compared by their
  // byte ranges: distinct columns pass, overlapping ones are refused.
  const at::TensorList skip_list = skip.has_value() ? at::TensorList(*skip) : at::TensorList();
  check_no_overlap(
      op, {{"mean", mean, true}, {"variance", variance, true}, {"deviation", deviation, true},
           {"current", current, false}, {"weight", weight, false, false, false},
           {"skip", skip_list, false, false, false}});
}

namespace {

// current[i] laid out exactly like averaged[i] (see check_average_args).
std::vector<at::Tensor> laid_out_like(at::TensorList averaged, at::TensorList current) {
  std::vector<at::Tensor> laid_out;
  laid_out.reserve(current.size());
  for (size_t i = 0; i < current.size(); ++i) {
    const at::Tensor& avg = averaged[i];
    const at::Tensor& cur = current[i];
    if (avg.numel() <= 1 || same_dense_layout(avg, cur)) {
      laid_out.push_back(cur);
    } else {
      // A real layout mismatch (e.g. channels_last model, contiguous average)
      // or a strided view costs one copy here instead of a strided kernel.
      at::Tensor copy = at::empty_strided(avg.sizes(), avg.strides(), cur.options());
      copy.copy_(cur);
      laid_out.push_back(std::move(copy));
    }
  }
  return laid_out;
}

}  // namespace

std::vector<at::Tensor> check_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList sq_mean,
    bool with_moments,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  validate_average_args(op, averaged, sq_mean, with_moments, current, weight, skip, /*read_weight_value=*/true);
  return laid_out_like(averaged, current);
}

std::vector<at::Tensor> check_stochastic_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const at::Tensor& counter,
    const std::optional<at::Tensor>& skip) {
  validate_stochastic_args(op, averaged, current, weight, counter, skip, /*read_weight_value=*/true);
  return laid_out_like(averaged, current);
}

void validate_multi_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value) {
  // The weights first: their count says how the flat list splits.
  TORCH_CHECK(
      weights.dim() == 1, op, ": weights must be a 1-D tensor (one weight per list of averages), got shape ",
      weights.sym_sizes());
  check_weight_dtype(op, "weights", weights);
  // Under torch.compile with dynamic shapes the count may be symbolic; the
  // list lengths it must divide are not, so it is specialized (guarded) here.
  const auto count = static_cast<size_t>(weights.sym_numel().guard_int(__FILE__, __LINE__));
  TORCH_CHECK(count >= 1, op, ": weights is empty; pass one weight per list of averages (at least one)");
  TORCH_CHECK(
      averaged.size() % count == 0, op, ": averaged has ", averaged.size(), " tensors, not a multiple of the ", count,
      " weights (averaged is the ", count, " lists of averages, one per weight, flattened list after list)");
  const size_t n = averaged.size() / count;
  TORCH_CHECK(
      current.size() == n, op, ": averaged has ", averaged.size(), " tensors (", count, " weights x ", n,
      ") but current has ", current.size());
  if (n == 0) {
    return;  // an empty update is a no-op, not an error
  }
  const c10::Device device = averaged[0].device();
  check_weight_device_and_range(op, "weights", weights, device, read_weight_value);
  check_skip(op, skip, device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& avg = averaged[i];
    check_pair(op, avg, current[i], i, device);
    for (size_t k = 1; k < count; ++k) {
      const size_t j = k * n + i;
      const at::Tensor& other = averaged[j];
      TORCH_CHECK(
          other.device() == avg.device() && other.sizes() == avg.sizes() && other.strides() == avg.strides() &&
              other.scalar_type() == avg.scalar_type(),
          op, ": averaged[", j, "] (average ", k, " of current[", i, "]) must match averaged[", i,
          "] in shape, strides, dtype and device; got shape ", other.sizes(), ", strides ", other.strides(), ", ",
          other.scalar_type(), " on ", other.device(), " for averaged[", i, "]'s ", avg.sizes(), ", ", avg.strides(),
          ", ", avg.scalar_type(), " on ", avg.device());
    }
  }
  // No exception for an average being its current tensor: with several
  // averages per tensor, a later one would read what an earlier one wrote.
  const at::TensorList skip_list = skip.has_value() ? at::TensorList(*skip) : at::TensorList();
  check_no_overlap(
      op, {{"averaged", averaged, true}, {"current", current, false}, {"weights", weights, false, false, false},
           {"skip", skip_list, false, false, false}});
}

std::vector<at::Tensor> check_multi_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& skip) {
  validate_multi_average_args(op, averaged, current, weights, skip, /*read_weight_value=*/true);
  return laid_out_like(averaged, current);
}

std::vector<at::Tensor> check_swag_args(
    const char* op,
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  validate_swag_args(op, mean, variance, deviation, current, weight, skip, /*read_weight_value=*/true);
  return laid_out_like(mean, current);
}

std::vector<double> read_weights(const at::Tensor& weights) {
  TORCH_CHECK(weights.is_cpu(), "read_weights: the weights are on ", weights.device(), ", not the CPU");
  std::vector<double> values(static_cast<size_t>(weights.numel()));
  const int64_t stride = weights.dim() == 0 ? 0 : weights.stride(0);
  const auto read = [&](const auto* data) {
    for (size_t k = 0; k < values.size(); ++k) {
      values[k] = static_cast<double>(data[static_cast<int64_t>(k) * stride]);
    }
  };
  if (weights.scalar_type() == c10::ScalarType::Double) {
    read(weights.const_data_ptr<double>());
  } else {
    read(weights.const_data_ptr<float>());
  }
  return values;
}

std::vector<at::Tensor> nonfinite_inputs(at::TensorList tensors) {
  std::vector<at::Tensor> scanned;
  scanned.reserve(tensors.size());
  for (const at::Tensor& tensor : tensors) {
    const c10::ScalarType dtype = tensor.scalar_type();
    at::Tensor t;
    if (float_rank(dtype) > 0) {
      t = tensor;
    } else if (at::isComplexType(dtype)) {
      t = at::view_as_real(tensor);  // NaN/Inf in either part
    } else if (at::isFloat8Type(dtype)) {
      t = tensor.to(c10::ScalarType::Float);  // exact; rare enough that the copy does not matter
    } else {
      continue;  // integer and bool tensors are always finite
    }
    scanned.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  return scanned;
}

c10::Device check_nonfinite_args(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "nonfinite_flag: needs at least one tensor to know the device of the flag");
  const c10::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(
        tensors[i].device() == device, "nonfinite_flag: tensors[", i, "] is on ", tensors[i].device(),
        " but tensors[0] is on ", device);
    TORCH_CHECK(
        tensors[i].layout() == c10::kStrided, "nonfinite_flag: tensors[", i, "] has layout ", tensors[i].layout(),
        "; pass strided (dense) tensors");
    TORCH_CHECK(
        tensors[i].scalar_type() != c10::ScalarType::Float4_e2m1fn_x2, "nonfinite_flag: tensors[", i,
        "] is Float4_e2m1fn_x2 (two packed values per byte), which it cannot read");
  }
  return device;
}

void bind_average(pybind11::module_& m) {
  m.def(
      "is_fusable_pair", &is_fusable_pair, pybind11::arg("averaged"), pybind11::arg("current"),
      "Whether the fused ops take this (averaged, current) pair as it is (dtypes and layout)");
  m.def(
      "validate_average_args",
      [](const std::string& op, const std::vector<at::Tensor>& averaged, const std::vector<at::Tensor>& sq_mean,
         bool with_moments, const std::vector<at::Tensor>& current, const at::Tensor& weight,
         const std::optional<at::Tensor>& skip) {
        validate_average_args(
            op.c_str(), averaged, sq_mean, with_moments, current, weight, skip, /*read_weight_value=*/false);
      },
      "The kernels' argument checks on metadata only (for the fake kernels)");
  m.def(
      "validate_multi_average_args",
      [](const std::string& op, const std::vector<at::Tensor>& averaged, const std::vector<at::Tensor>& current,
         const at::Tensor& weights, const std::optional<at::Tensor>& skip) {
        validate_multi_average_args(op.c_str(), averaged, current, weights, skip, /*read_weight_value=*/false);
      },
      "multi_average_'s argument checks on metadata only (for its fake kernel)");
  m.def(
      "validate_swag_args",
      [](const std::string& op, const std::vector<at::Tensor>& mean, const std::vector<at::Tensor>& variance,
         const std::vector<at::Tensor>& deviation, const std::vector<at::Tensor>& current, const at::Tensor& weight,
         const std::optional<at::Tensor>& skip) {
        validate_swag_args(
            op.c_str(), mean, variance, deviation, current, weight, skip, /*read_weight_value=*/false);
      },
      "swag_moments_'s argument checks on metadata only (for its fake kernel)");
  m.def(
      "validate_stochastic_args",
      [](const std::string& op, const std::vector<at::Tensor>& averaged, const std::vector<at::Tensor>& current,
         const at::Tensor& weight, const at::Tensor& counter, const std::optional<at::Tensor>& skip) {
        validate_stochastic_args(op.c_str(), averaged, current, weight, counter, skip, /*read_weight_value=*/false);
      },
      "average_stochastic_'s argument checks on metadata only (for its fake kernel)");
  m.def(
      "is_stochastic_pair",
      [](const at::Tensor& averaged, const at::Tensor& current) {
        return is_stochastic_dtype_pair(averaged.scalar_type(), current.scalar_type()) &&
            averaged.is_non_overlapping_and_dense();
      },
      pybind11::arg("averaged"), pybind11::arg("current"),
      "Whether average_stochastic_ takes this (averaged, current) pair as it is (dtypes and layout)");
  m.def(
      "check_nonfinite_args", [](const std::vector<at::Tensor>& tensors) { check_nonfinite_args(tensors); },
      "nonfinite_flag's argument checks (for its fake kernel)");
  m.def(
      "dtypes_and_devices",
      [](const std::vector<at::Tensor>& tensors) {
        // Three bytes per tensor, exact (no hash): AveragedModel's cached plan compares them
        // on every update, one call instead of two Python attribute reads per tensor.
        std::string key;
        key.reserve(3 * tensors.size());
        for (const at::Tensor& t : tensors) {
          key.push_back(static_cast<char>(t.scalar_type()));
          key.push_back(static_cast<char>(t.device().type()));
          key.push_back(static_cast<char>(t.device().index()));
        }
        return pybind11::bytes(key);
      },
      "The dtype and device of every tensor, as bytes (for AveragedModel's plan check)");
}

}  // namespace swa_fast
