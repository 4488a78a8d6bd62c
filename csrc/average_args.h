// Argument checks shared by the CPU and CUDA kernels of the averaging ops.
//
// Every check runs on the host before any tensor is written, so bad input
// raises with nothing modified, and none of them reads device memory (no sync).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

namespace swa_fast {

// True for the dtypes the kernels handle: float16, bfloat16, float32, float64
// (averaged) and integer/bool (copied). Not float8/float4 or complex.
bool has_average_kernel(c10::ScalarType dtype);

// True when `current` may be averaged into `averaged`: the same dtype, or a
// floating `current` of lower precision than a floating `averaged` (an fp32
// or fp64 shadow of a half-precision model), both with a kernel
// (has_average_kernel). Integer/bool pairs must match.
bool is_supported_dtype_pair(c10::ScalarType averaged, c10::ScalarType current);

// average_stochastic_'s pairs: a float16/bfloat16 average takes a float16,
// bfloat16 or float32 current (computed in float32, rounded stochastically);
// float32/float64 averages and integer/bool copies as is_supported_dtype_pair.
bool is_stochastic_dtype_pair(c10::ScalarType averaged, c10::ScalarType current);

// True when the fused ops take this pair as it is: a supported dtype pair and
// a dense (non-overlapping) averaged tensor. Devices and shapes are not
// considered. Python uses it to route the rare other pairs around the kernels.
bool is_fusable_pair(const at::Tensor& averaged, const at::Tensor& current);

// Every check of average_ / average_moments_ (pass an empty `sq_mean` for
// average_). Reads nothing but metadata unless `read_weight_value`, so the
// fake kernels run it on fake tensors under torch.compile too.
void validate_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList sq_mean,
    bool with_moments,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value);

// Validates the arguments of average_ / average_moments_ (pass an empty
// `sq_mean` for average_) and returns the current tensors laid out exactly
// like their averaged counterparts: the same tensor when strides already
// match, else a dense copy with the averaged tensor's strides. The kernels can
// then walk every pair as two flat arrays.
std::vector<at::Tensor> check_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList sq_mean,
    bool with_moments,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip);

// Every check of multi_average_: averaged is weights.numel() lists of
// current.size() tensors, flat and k-major; each average of current[i]
// matches averaged[i] (which passes average_'s pair checks) in shape, strides,
// dtype and device; weights is 1-D float32/float64, non-empty, on the device
// (on the CPU, with `read_weight_value`, each in [0, 1]); no written tensor
// shares memory with another tensor of the call. Metadata only otherwise.
void validate_multi_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value);

// validate_multi_average_args, then current laid out like the first list of
// averages (as check_average_args does).
std::vector<at::Tensor> check_multi_average_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& skip);

// Every check of swag_moments_: mean, variance and current have one tensor
// per index, deviation one per index or none (an empty list); mean[i] and
// current[i] pass average_'s pair checks and are floating (integer, bool,
// complex and float8 tensors are refused: SWAG averages floating parameters);
// variance[i] and deviation[i] match mean[i] in shape, strides, dtype and
// device; weight and skip as for average_; no written tensor shares memory
// with another tensor of the call (distinct, non-overlapping views of one
// storage, e.g. the columns of a deviation ring buffer, are fine). Reads
// nothing but metadata unless `read_weight_value`.
void validate_swag_args(
    const char* op,
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value);

// validate_swag_args, then current laid out like mean (as check_average_args
// does).
std::vector<at::Tensor> check_swag_args(
    const char* op,
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip);

// Every check of average_stochastic_: average_'s, with its own dtype pairs
// (is_stochastic_dtype_pair), and `counter` a 0-dim int64 tensor on the
// averaged device. Reads nothing but metadata unless `read_weight_value`.
void validate_stochastic_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const at::Tensor& counter,
    const std::optional<at::Tensor>& skip,
    bool read_weight_value);

// validate_stochastic_args, then current laid out like averaged (as
// check_average_args does).
std::vector<at::Tensor> check_stochastic_args(
    const char* op,
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const at::Tensor& counter,
    const std::optional<at::Tensor>& skip);

// The values of a CPU float32/float64 weight tensor (0-dim or 1-D, any
// stride), each read as double.
std::vector<double> read_weights(const at::Tensor& weights);

// Checks the list of nonfinite_flag; returns the device all tensors are on.
c10::Device check_nonfinite_args(at::TensorList tensors);

// What nonfinite_flag scans, for both kernels: float16/bfloat16/float32/float64
// tensors as they are, complex ones as their real view (NaN in either part
// counts), float8 ones as float32 copies; integer and bool tensors are left
// out. Non-dense views become contiguous copies.
std::vector<at::Tensor> nonfinite_inputs(at::TensorList tensors);

}  // namespace swa_fast
