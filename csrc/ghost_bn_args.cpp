#include "ghost_bn_args.h"

#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>

#include "bindings.h"
#include "dtypes.h"
#include "inplace.h"
#include "overlap.h"

namespace swa_fast {

TORCH_LIBRARY_FRAGMENT(swa_fast, m) {
  // Training-mode ghost batch norm: input (N, C, *) split into ghosts of
  // ghost_batch_size samples along N (the last may be smaller), each
  // normalized with its own biased statistics, then weight/bias (optional).
  // Returns the output (input's dtype and memory format) and the per-ghost
  // mean and biased variance, [G, C] in float32 (float64 for float64 input).
  m.def(
      "ghost_batch_norm(Tensor input, Tensor? weight, Tensor? bias, int ghost_batch_size, float eps) "
      "-> (Tensor output, Tensor mean, Tensor var)");
  // Gradients of ghost_batch_norm from its saved mean/var. grad_input is an
  // empty tensor when compute_grad_input is false; grad_weight and grad_bias
  // ([C], weight's dtype, or the statistics dtype without weight) are always
  // computed: they come from the same per-ghost sums dx needs.
  m.def(
      "ghost_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var, "
      "int ghost_batch_size, float eps, bool compute_grad_input) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Folds the per-ghost statistics into the running ones, reading and
  // advancing num_batches_tracked on the device (no sync). Unbiased variance
  // (n / (n - 1), n = a ghost's samples x sample_numel) is stored.
  //   average_ghosts = false: one step per ghost, in order, exactly what
  //     F.batch_norm on each chunk in turn would do; num_batches_tracked += G.
  //   average_ghosts = true: one step with the ghost-size-weighted mean of
  //     the ghosts' means and unbiased variances; num_batches_tracked += 1.
  // momentum None: cumulative average, factor 1 / num_batches_tracked.
  m.def(
      "ghost_batch_norm_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor mean, Tensor var, int batch_size, int ghost_batch_size, "
      "int sample_numel, float? momentum, bool average_ghosts) -> ()");
}

// The buffer update follows torch's in-place rules (inplace.h); the forward
// and backward are functional (ghost_batch_norm has an autograd formula in
// swa_fast/ops/ghost_bn.py).
TORCH_LIBRARY_IMPL(swa_fast, Autograd, m) {
  m.impl("ghost_batch_norm_update_stats_", inplace::autograd_kernel());
}

TORCH_LIBRARY_IMPL(swa_fast, ADInplaceOrView, m) {
  m.impl("ghost_batch_norm_update_stats_", inplace::inplace_or_view_kernel());
}

namespace {

// The number of ghosts, under nn.BatchNorm's rule for batch statistics: more
// than one value per channel in every ghost, i.e. a ghost of one sample is
// fine when each sample has several values per channel (spatial > 1). Empty
// input (N = 0 or spatial = 0) is allowed, as BatchNorm allows it: N = 0 is
// one empty ghost (what the chunk loop x.split(ghost) gives, and what
// BatchNorm counts as one batch).
int64_t checked_num_ghosts(const char* op, int64_t batch, int64_t ghost_batch_size, int64_t spatial) {
  TORCH_CHECK_VALUE(
      ghost_batch_size >= 1, op, ": ghost_batch_size must be a positive number of samples, got ", ghost_batch_size);
  TORCH_CHECK_VALUE(batch >= 0, op, ": the batch size must be >= 0, got ", batch);
  if (batch == 0) {
    return 1;
  }
  const int64_t num_ghosts = (batch + ghost_batch_size - 1) / ghost_batch_size;
  const int64_t last = batch - (num_ghosts - 1) * ghost_batch_size;
  // The same error nn.BatchNorm raises for a batch of one value per channel,
  // naming what made a ghost of one sample.
  if (last == 1 && spatial == 1) {
    if (batch == 1) {
      TORCH_CHECK_VALUE(
          false, op, ": Expected more than 1 value per channel when training: a batch of N = 1 sample is one "
          "ghost of 1 sample (ghost_batch_size=", ghost_batch_size, ")");
    }
    if (ghost_batch_size == 1) {
      TORCH_CHECK_VALUE(
          false, op, ": Expected more than 1 value per channel when training: ghost_batch_size=1 makes every "
          "ghost one sample (N = ", batch, ")");
    }
    TORCH_CHECK_VALUE(
        false, op, ": Expected more than 1 value per channel when training: ghost_batch_size=", ghost_batch_size,
        " and N = ", batch, " leave a last ghost of 1 sample (", num_ghosts - 1, " x ", ghost_batch_size,
        " + 1); use a batch size that leaves no remainder of 1, or drop the last incomplete batch");
  }
  return num_ghosts;
}

void check_affine(
    const char* op, const char* name, const std::optional<at::Tensor>& param, const at::Tensor& input) {
  if (!param.has_value() || !param->defined()) {
    return;
  }
  const auto channels = input.size(1);
  TORCH_CHECK(
      param->dim() == 1 && param->size(0) == channels, op, ": ", name, " must have shape [", channels,
      "] (one value per channel of the input), got ", param->sizes());
  TORCH_CHECK(
      param->device() == input.device(), op, ": ", name, " is on ", param->device(), " but input is on ",
      input.device());
  const auto dtype = param->scalar_type();
  TORCH_CHECK_TYPE(
      dtype == input.scalar_type() || (dtype == c10::ScalarType::Float && is_reduced_float(input.scalar_type())), op,
      ": ", name, " must have the input's dtype (", input.scalar_type(), ")",
      is_reduced_float(input.scalar_type()) ? " or float32" : "", ", got ", dtype);
}

void check_stats(
    const char* op, const char* name, const at::Tensor& stats, const GhostGeometry& geometry,
    c10::ScalarType dtype, c10::Device device) {
  TORCH_CHECK(
      stats.dim() == 2 && stats.size(0) == geometry.num_ghosts && stats.size(1) == geometry.channels, op, ": ", name,
      " must have shape [", geometry.num_ghosts, ", ", geometry.channels, "] (ghosts x channels), got ",
      stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == device, op, ": ", name, " is on ", stats.device(), " but input is on ", device);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_ghost_batch_norm(
    const at::Tensor& input, const GhostGeometry& geometry) {
  const auto stats_options = input.options().dtype(ghost_stats_dtype(input.scalar_type()));
  return {
      at::empty_like(input, ghost_memory_format(input)), at::zeros({geometry.num_ghosts, geometry.channels}, stats_options),
      at::zeros({geometry.num_ghosts, geometry.channels}, stats_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_ghost_batch_norm_backward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const GhostGeometry& geometry, bool compute_grad_input) {
  const bool has_weight = weight.has_value() && weight->defined();
  const auto param_options = has_weight ? weight->options() : mean.options();
  at::Tensor grad_input =
      compute_grad_input ? at::empty_like(input, ghost_memory_format(input)) : at::empty({0}, input.options());
  return {grad_input, at::zeros({geometry.channels}, param_options), at::zeros({geometry.channels}, param_options)};
}

bool updates_running_stats(const GhostGeometry& geometry) {
  return geometry.batch > 0 && geometry.spatial > 0 && geometry.channels > 0;
}

at::MemoryFormat ghost_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) {
    return at::MemoryFormat::Contiguous;
  }
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

c10::ScalarType ghost_stats_dtype(c10::ScalarType input_dtype) {
  return input_dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

GhostGeometry validate_ghost_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    int64_t ghost_batch_size,
    double eps) {
  const char* op = "swa_fast.ghost_batch_norm";
  TORCH_CHECK_VALUE(
      input.dim() >= 2 && input.dim() <= 5, op, ": input must be (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), "
      "got shape ", input.sizes());
  TORCH_CHECK_TYPE(
      is_kernel_float(input.scalar_type()), op, ": input must be float16, bfloat16, float32 or float64, got ",
      input.scalar_type());
  // As F.batch_norm with batch statistics: eps = 0 divides a constant channel by zero.
  TORCH_CHECK_VALUE(eps > 0.0, op, ": eps must be positive when normalizing with batch statistics, got ", eps);
  check_affine(op, "weight", weight, input);
  check_affine(op, "bias", bias, input);
  if (weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(
        weight->scalar_type() == bias->scalar_type(), op, ": weight (", weight->scalar_type(), ") and bias (",
        bias->scalar_type(), ") must have one dtype");
  }

  GhostGeometry geometry;
  geometry.batch = input.size(0);
  geometry.channels = input.size(1);
  geometry.spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    geometry.spatial *= input.size(d);
  }
  geometry.num_ghosts = checked_num_ghosts(op, geometry.batch, ghost_batch_size, geometry.spatial);
  // A ghost size above N makes one ghost of N samples; clamping keeps products
  // such as ghost_size * C * S within the element count.
  geometry.ghost_size = std::min(ghost_batch_size, geometry.batch);
  geometry.layout = (geometry.spatial == 1 || ghost_memory_format(input) != at::MemoryFormat::Contiguous)
      ? GhostLayout::ChannelsLast
      : GhostLayout::ChannelsFirst;
  return geometry;
}

GhostGeometry validate_ghost_batch_norm_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t ghost_batch_size,
    double eps) {
  const char* op = "swa_fast.ghost_batch_norm_backward";
  const GhostGeometry geometry = validate_ghost_batch_norm_args(input, weight, std::nullopt, ghost_batch_size, eps);
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(), op, ": grad_output must have the input's shape ", input.sizes(), ", got ",
      grad_output.sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == input.scalar_type(), op, ": grad_output must have the input's dtype (",
      input.scalar_type(), "), got ", grad_output.scalar_type());
  TORCH_CHECK(
      grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(), " but input is on ",
      input.device());
  const auto stats_dtype = ghost_stats_dtype(input.scalar_type());
  check_stats(op, "mean", mean, geometry, stats_dtype, input.device());
  check_stats(op, "var", var, geometry, stats_dtype, input.device());
  return geometry;
}

GhostGeometry validate_ghost_update_stats_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t batch_size,
    int64_t ghost_batch_size,
    int64_t sample_numel,
    std::optional<double> momentum) {
  const char* op = "swa_fast.ghost_batch_norm_update_stats_";
  GhostGeometry geometry;
  geometry.batch = batch_size;
  geometry.channels = mean.dim() == 2 ? mean.size(1) : -1;
  geometry.spatial = sample_numel;
  TORCH_CHECK_VALUE(sample_numel >= 0, op, ": sample_numel must be >= 0, got ", sample_numel);
  geometry.num_ghosts = checked_num_ghosts(op, batch_size, ghost_batch_size, sample_numel);
  geometry.ghost_size = std::min(ghost_batch_size, batch_size);
  geometry.layout = GhostLayout::ChannelsLast;
  // Any momentum is accepted, as nn.BatchNorm and F.batch_norm accept it: convert_ghost_batchnorm replaces
  // every BatchNorm, so refusing a value torch takes would break a converted model at its first forward.
  const auto device = mean.device();
  TORCH_CHECK_TYPE(
      mean.scalar_type() == c10::ScalarType::Float || mean.scalar_type() == c10::ScalarType::Double, op,
      ": mean must be float32 or float64, got ", mean.scalar_type());
  check_stats(op, "mean", mean, geometry, mean.scalar_type(), device);
  check_stats(op, "var", var, geometry, mean.scalar_type(), device);
  for (const auto& [name, running] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    TORCH_CHECK(
        running->dim() == 1 && running->size(0) == geometry.channels, op, ": ", name, " must have shape [",
        geometry.channels, "], got ", running->sizes());
    TORCH_CHECK_TYPE(is_kernel_float(running->scalar_type()), op, ": ", name, " must be floating, got ",
                     running->scalar_type());
    TORCH_CHECK(running->device() == device, op, ": ", name, " is on ", running->device(), " but mean is on ", device);
    TORCH_CHECK(running->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(
      running_var.scalar_type() == running_mean.scalar_type(), op, ": running_var (", running_var.scalar_type(),
      ") must have running_mean's dtype (", running_mean.scalar_type(), ")");
  TORCH_CHECK(
      num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == c10::ScalarType::Long, op,
      ": num_batches_tracked must be a one-element int64 tensor, got ", num_batches_tracked.scalar_type(), " of shape ",
      num_batches_tracked.sizes());
  TORCH_CHECK(
      num_batches_tracked.device() == device, op, ": num_batches_tracked is on ", num_batches_tracked.device(),
      " but mean is on ", device);
  // The running statistics and the count are written while the per-ghost
  // statistics are read: no two of them may share memory.
  check_no_overlap(
      op, {{"running_mean", running_mean, true, false, false}, {"running_var", running_var, true, false, false},
           {"num_batches_tracked", num_batches_tracked, true, false, false}, {"mean", mean, false, false, false},
           {"var", var, false, false, false}});
  return geometry;
}

void bind_ghost_bn(pybind11::module_& m) {
  m.def(
      "validate_ghost_batch_norm_args",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         int64_t ghost_batch_size, double eps) {
        const auto geometry = validate_ghost_batch_norm_args(input, weight, bias, ghost_batch_size, eps);
        const at::MemoryFormat format = ghost_memory_format(input);
        return pybind11::make_tuple(
            geometry.num_ghosts, geometry.channels,
            format == at::MemoryFormat::Contiguous ? "contiguous"
                : format == at::MemoryFormat::ChannelsLast ? "channels_last" : "channels_last_3d",
            std::string(c10::toString(ghost_stats_dtype(input.scalar_type()))));
      },
      "ghost_batch_norm's checks on metadata; returns (num_ghosts, channels, the output's memory format, the "
      "statistics' dtype name) for the fake kernel");
  m.def(
      "validate_ghost_batch_norm_backward_args",
      [](const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
         const at::Tensor& mean, const at::Tensor& var, int64_t ghost_batch_size, double eps) {
        validate_ghost_batch_norm_backward_args(grad_output, input, weight, mean, var, ghost_batch_size, eps);
      },
      "ghost_batch_norm_backward's checks on metadata (for the fake kernel)");
  m.def(
      "validate_ghost_update_stats_args",
      [](const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& num_batches_tracked,
         const at::Tensor& mean, const at::Tensor& var, int64_t batch_size, int64_t ghost_batch_size,
         int64_t sample_numel, std::optional<double> momentum) {
        validate_ghost_update_stats_args(
            running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel,
            momentum);
      },
      "ghost_batch_norm_update_stats_'s checks on metadata (for the fake kernel)");
}

}  // namespace swa_fast
