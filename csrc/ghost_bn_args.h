// Shapes, layouts and argument checks shared by the CPU and CUDA kernels of
// ghost batch normalization (and, through pybind, by the fake kernels).
//
// Ghost batches are contiguous chunks of `ghost_batch_size` samples along N;
// the last one is smaller when N is not a multiple. Statistics are kept per
// (ghost, channel) as [G, C] tensors in the statistics dtype: float32, or
// float64 for float64 input.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "host_device.h"

namespace swa_fast {

// How the kernels walk the input. Every layout is a dense [N, ..., ...] array:
//   ChannelsFirst: [N, C, S] (contiguous input with S = prod(spatial) > 1);
//   ChannelsLast:  [N, S, C] (channels_last / channels_last_3d input, and any
//                  input with S == 1, e.g. (N, C), whose memory is the same).
enum class GhostLayout { ChannelsFirst, ChannelsLast };

// The geometry of one call, read from metadata only; the CPU and CUDA
// kernels both walk it (it is passed to CUDA kernels by value).
struct GhostGeometry {
  int64_t batch;        // N
  int64_t channels;     // C
  int64_t spatial;      // S: values per channel per sample
  int64_t ghost_size;   // samples per ghost, at most N (the last ghost may have fewer)
  int64_t num_ghosts;   // G = ceil(N / ghost_size)
  GhostLayout layout;

  // Samples in ghost g.
  SWA_FAST_HOST_DEVICE int64_t ghost_samples(int64_t g) const {
    const int64_t left = batch - g * ghost_size;
    return left < ghost_size ? left : ghost_size;
  }
};

// The memory format the kernels run in and the output is created with:
// channels_last for channels_last 4-D input, channels_last_3d for 5-D, else
// contiguous (a tensor that is both, e.g. H = W = 1, counts as contiguous).
at::MemoryFormat ghost_memory_format(const at::Tensor& input);

// float64 for float64 input, float32 otherwise (fp16/bf16/fp32 input).
c10::ScalarType ghost_stats_dtype(c10::ScalarType input_dtype);

// ghost_batch_norm's checks: input (N, C, *) with 2 to 5 dims and floating
// dtype; weight/bias None or 1-D of C on the input's device, in the input's
// dtype or float32 for half/bfloat16 input; ghost_batch_size >= 1; eps > 0;
// more than one value per channel in every ghost (nn.BatchNorm's rule), or
// empty input. Metadata only.
GhostGeometry validate_ghost_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    int64_t ghost_batch_size,
    double eps);

// ghost_batch_norm_backward's checks: the forward's, plus grad_output shaped
// like input and mean/var of shape [G, C] in the statistics dtype.
GhostGeometry validate_ghost_batch_norm_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t ghost_batch_size,
    double eps);

// ghost_batch_norm_update_stats_'s checks: running_mean/running_var 1-D of C
// floating, num_batches_tracked a one-element int64 tensor, all on the device
// of mean/var ([G, C]); batch_size, ghost_batch_size and sample_numel give G
// ghosts of more than one value per channel each (or an empty batch);
// momentum, when given, in [0, 1]. Returns the geometry with spatial =
// sample_numel (layout unused).
GhostGeometry validate_ghost_update_stats_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t batch_size,
    int64_t ghost_batch_size,
    int64_t sample_numel,
    std::optional<double> momentum);

// Empty input (no values: N = 0, a spatial size 0, or C = 0), treated as
// F.batch_norm treats it, for both kernels: an empty output, statistics of
// zeros (there are none), no running-statistics update (num_batches_tracked
// still counts the batch), zero gradients for weight and bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_ghost_batch_norm(
    const at::Tensor& input, const GhostGeometry& geometry);
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_ghost_batch_norm_backward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const GhostGeometry& geometry, bool compute_grad_input);

// Whether ghost_batch_norm_update_stats_ changes the running statistics (it
// always advances num_batches_tracked): not for an empty batch.
bool updates_running_stats(const GhostGeometry& geometry);

}  // namespace swa_fast
