// CUDA kernels of ghost batch normalization.
//
// Structure (mirrors csrc/cpu/ghost_bn_cpu.cpp section by section):
//   1. entry points validate (ghost_bn_args.h) and lay the input out densely
//      as [N, C, S] (ChannelsFirst) or [N, S, C] (ChannelsLast);
//   2. ghost_statistics: per (ghost, channel) mean and biased variance in one
//      read of the input: every thread keeps Welford moments, merged with
//      Chan's formula within the block (no sum-of-squares cancellation);
//   3. ghost_normalize: y = x * scale[g, c] + shift[g, c], one elementwise
//      pass; scale/shift are computed where the statistics are finished;
//   4. ghost_backward_sums: per (ghost, channel) sums of dy and
//      dy * (x - mean) in one reduction, which also finishes the dx
//      coefficients a, k, d;
//   5. ghost_grad_input: dx = a * dy - k * x + d, one elementwise pass, and
//      ghost_grad_affine: grad weight/bias summed over ghosts in order;
//   6. ghost_update_running_stats: one thread per channel, ghosts in order,
//      num_batches_tracked read on the device.
//
// The pieces live in their own files: the reduction engine of steps 2 and 4
// (cuda/ghost_bn_reduce.cuh), the elementwise kernel of steps 3 and 5
// (cuda/ghost_bn_apply.cuh), the launch constants and per-channel tensor
// access (cuda/ghost_bn_common.cuh), and the per-(ghost, channel) formulas
// shared with the CPU kernels (ghost_bn_formulas.h). This file holds what
// each step sums (the Ops), the steps themselves and the op entry points.
//
// Every kernel uses 16-byte vector accesses whenever the contiguous run it
// reads (a row of S values for ChannelsFirst, of C channels for
// ChannelsLast) is a multiple of the vector width, scalar ones otherwise: a
// choice by shape alone. The entry points copy an input that starts off a
// 16-byte boundary (a rare storage offset) to fresh memory first, so the
// grouping of values, the thread counts and the splits, and with them the
// order of every addition, never depend on where a tensor starts: a
// misaligned view gives the bits of an aligned copy. All offsets are int64.
//
// Nothing is read back to the host (num_batches_tracked included), so a
// training step that calls these ops can be captured in a CUDA graph.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/ghost_bn_apply.cuh"
#include "cuda/ghost_bn_common.cuh"
#include "cuda/ghost_bn_reduce.cuh"
#include "ghost_bn_args.h"
#include "ghost_bn_formulas.h"

namespace swa_fast {
namespace ghost {
namespace {

// ---------------------------------------------------------------------------
// Statistics (CPU: ghost_statistics_channels_first/_last, affine_coefficients)
// ---------------------------------------------------------------------------

template <typename T>
struct WelfordAcc {
  T mean;
  T m2;  // sum of squared deviations from mean
  int64_t count;
};

// Welford moments; batches of K values enter with Chan's formula (their own
// mean and squared deviations first, taken in registers), so a thread pays
// one division per batch. finalize writes mean, biased var, and the affine
// scale/shift ghost_normalize applies.
template <typename T>
struct WelfordOp {
  using value_t = T;
  using Acc = WelfordAcc<T>;
  static constexpr bool kReadsGrad = false;

  struct Params {
    T* mean;   // [G, C] outputs
    T* var;
    T* scale;  // [G, C] workspace for ghost_normalize
    T* shift;
    ParamRef weight;
    ParamRef bias;
    T eps;
    int64_t channels;
    T* part_mean;  // [G * C * splits] when splits > 1
    T* part_m2;
    int64_t* part_count;
  };

  static __device__ __forceinline__ Acc identity() {
    return Acc{T(0), T(0), 0};
  }

  static __device__ __forceinline__ T context(const Params&, int64_t) {
    return T(0);
  }

  template <int K>
  static __device__ __forceinline__ void add(Acc& acc, const T (&x)[K], const T (&)[K], T) {
    T sum = x[0];
#pragma unroll
    for (int k = 1; k < K; ++k) {
      sum += x[k];
    }
    const T batch_mean = sum / static_cast<T>(K);
    T batch_m2 = T(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const T d = x[k] - batch_mean;
      batch_m2 += d * d;
    }
    if (acc.count == 0) {  // (0 * inf would turn an overflowing delta into NaN below)
      acc = Acc{batch_mean, batch_m2, K};
      return;
    }
    const int64_t count = acc.count + K;
    const T w = static_cast<T>(K) / static_cast<T>(count);
    const T delta = batch_mean - acc.mean;
    acc.mean += delta * w;
    acc.m2 += batch_m2 + delta * delta * (static_cast<T>(acc.count) * w);
    acc.count = count;
  }

  // The rows' count and Chan weight are shared by all V channels: one
  // division per R rows, and one live count instead of V.
  template <int R, int V>
  static __device__ __forceinline__ void add_rows(Acc (&acc)[V], const T (&x)[R][V], const T (&)[R][V],
                                                  const T (&)[V]) {
    const int64_t old = acc[0].count;
    const int64_t count = old + R;
    const T w = static_cast<T>(R) / static_cast<T>(count);
    const T old_w = static_cast<T>(old) * w;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      T sum = x[0][v];
#pragma unroll
      for (int r = 1; r < R; ++r) {
        sum += x[r][v];
      }
      const T batch_mean = sum / static_cast<T>(R);
      T batch_m2 = T(0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const T d = x[r][v] - batch_mean;
        batch_m2 += d * d;
      }
      if (old == 0) {
        acc[v] = Acc{batch_mean, batch_m2, count};
      } else {
        const T delta = batch_mean - acc[v].mean;
        acc[v] = Acc{acc[v].mean + delta * w, acc[v].m2 + batch_m2 + delta * delta * old_w, count};
      }
    }
  }

  static __device__ __forceinline__ Acc merge(const Acc& a, const Acc& b) {
    if (b.count == 0) {
      return a;
    }
    if (a.count == 0) {
      return b;
    }
    const int64_t count = a.count + b.count;
    const T w = static_cast<T>(b.count) / static_cast<T>(count);
    const T delta = b.mean - a.mean;
    return Acc{a.mean + delta * w, a.m2 + b.m2 + delta * delta * (static_cast<T>(a.count) * w), count};
  }

  static __device__ __forceinline__ Acc shfl_down(const Acc& a, int offset) {
    return Acc{
        __shfl_down_sync(reduce::kFullMask, a.mean, offset), __shfl_down_sync(reduce::kFullMask, a.m2, offset),
        __shfl_down_sync(reduce::kFullMask, a.count, offset)};
  }

  // The statistics, and scale/shift from ghost::affine_coefficients (the CPU's formula).
  static __device__ __forceinline__ void finalize(const Params& p, int64_t pair, const Acc& acc) {
    const int64_t c = pair % p.channels;
    const T mean = acc.mean;
    const T var = acc.m2 / static_cast<T>(acc.count);  // count >= 2: every ghost has 2+ values
    p.mean[pair] = mean;
    p.var[pair] = var;
    const Affine<T> affine = affine_coefficients(mean, var, p.weight.get(c, T(1)), p.bias.get(c, T(0)), p.eps);
    p.scale[pair] = affine.scale;
    p.shift[pair] = affine.shift;
  }

  static __device__ __forceinline__ void store_partial(const Params& p, int64_t i, const Acc& acc) {
    p.part_mean[i] = acc.mean;
    p.part_m2[i] = acc.m2;
    p.part_count[i] = acc.count;
  }

  static __device__ __forceinline__ Acc load_partial(const Params& p, int64_t i) {
    return Acc{p.part_mean[i], p.part_m2[i], p.part_count[i]};
  }
};

// Fills mean/var ([G, C]) and scale/shift ([G * C] each, opmath).
template <typename scalar_t>
void ghost_statistics(
    const at::Tensor& x,
    const GhostGeometry& shape,
    GhostLayout layout,
    at::Tensor& mean,
    at::Tensor& var,
    at::Tensor& scale_shift,
    const ParamRef& weight,
    const ParamRef& bias,
    double eps,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  using Op = WelfordOp<T>;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  T* coefficients = scale_shift.mutable_data_ptr<T>();
  typename Op::Params params{
      mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>(), coefficients, coefficients + pairs, weight, bias,
      static_cast<T>(eps), shape.channels, nullptr, nullptr, nullptr};
  // Partials live until the merge kernel, queued on the same stream, has
  // read them: the caching allocator only reuses a block after the work
  // already queued on its stream.
  at::Tensor partials, partial_counts;
  const auto alloc_partials = [&](typename Op::Params& p, int64_t count) {
    partials = at::empty({2 * count}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
    partial_counts = at::empty({count}, x.options().dtype(at::kLong));
    p.part_mean = partials.mutable_data_ptr<T>();
    p.part_m2 = p.part_mean + count;
    p.part_count = partial_counts.mutable_data_ptr<int64_t>();
  };
  run_reduction<Op, scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, params, shape, layout, alloc_partials, stream);
}

template <typename scalar_t>
void ghost_normalize(
    const at::Tensor& x,
    at::Tensor& output,
    const at::Tensor& scale_shift,
    const GhostGeometry& shape,
    GhostLayout layout,
    c10::DeviceIndex device,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  const T* scale = scale_shift.const_data_ptr<T>();
  const T* shift = scale + shape.num_ghosts * shape.channels;
  run_apply<scalar_t, false>(
      output.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nullptr, scale, shift, nullptr, shape,
      layout, device, stream);
}

// ---------------------------------------------------------------------------
// Backward sums (CPU: ghost_backward_sums, and grad_coefficients' per-ghost part)
// ---------------------------------------------------------------------------

template <typename T>
struct GradAcc {
  T sum_dy;
  T sum_dy_xmu;
};

// sum_dy and sum_dy_xmu per (ghost, channel). finalize also computes what
// the CPU's grad_coefficients does per (ghost, channel): the grad_weight
// term sum_dy_xmu * invstd and, when dx is wanted, a, k and d.
template <typename T>
struct GradSumsOp {
  using value_t = T;
  using Acc = GradAcc<T>;
  static constexpr bool kReadsGrad = true;

  struct Params {
    const T* mean;  // [G, C] saved statistics
    const T* var;
    ParamRef weight;
    T eps;
    GhostGeometry shape;
    T* sum_dy;      // [G * C]: grad_bias terms
    T* weight_term; // [G * C]: sum_dy_xmu * invstd, grad_weight terms
    T* a;           // [G * C] dx coefficients; nullptr without grad_input
    T* k;
    T* d;
    T* part_dy;     // [G * C * splits] when splits > 1
    T* part_dy_xmu;
  };

  static __device__ __forceinline__ Acc identity() {
    return Acc{T(0), T(0)};
  }

  static __device__ __forceinline__ T context(const Params& p, int64_t pair) {
    return p.mean[pair];
  }

  template <int K>
  static __device__ __forceinline__ void add(Acc& acc, const T (&x)[K], const T (&dy)[K], T mean) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc.sum_dy += dy[k];
      acc.sum_dy_xmu += dy[k] * (x[k] - mean);
    }
  }

  template <int R, int V>
  static __device__ __forceinline__ void add_rows(Acc (&acc)[V], const T (&x)[R][V], const T (&dy)[R][V],
                                                  const T (&mean)[V]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc[v].sum_dy += dy[r][v];
        acc[v].sum_dy_xmu += dy[r][v] * (x[r][v] - mean[v]);
      }
    }
  }

  static __device__ __forceinline__ Acc merge(const Acc& a, const Acc& b) {
    return Acc{a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }

  static __device__ __forceinline__ Acc shfl_down(const Acc& a, int offset) {
    return Acc{__shfl_down_sync(reduce::kFullMask, a.sum_dy, offset), __shfl_down_sync(reduce::kFullMask, a.sum_dy_xmu, offset)};
  }

  // ghost::grad_coefficients for one (ghost, channel), as the CPU computes them.
  static __device__ __forceinline__ void finalize(const Params& p, int64_t pair, const Acc& acc) {
    const int64_t C = p.shape.channels;
    const int64_t g = pair / C;
    const int64_t c = pair - g * C;
    const T n = static_cast<T>(p.shape.ghost_samples(g) * p.shape.spatial);
    const GradCoefficients<T> coef =
        grad_coefficients(p.mean[pair], p.var[pair], acc.sum_dy, acc.sum_dy_xmu, p.weight.get(c, T(1)), p.eps, n);
    p.sum_dy[pair] = acc.sum_dy;
    p.weight_term[pair] = coef.weight_term;
    if (p.a != nullptr) {
      p.a[pair] = coef.a;
      p.k[pair] = coef.k;
      p.d[pair] = coef.d;
    }
  }

  static __device__ __forceinline__ void store_partial(const Params& p, int64_t i, const Acc& acc) {
    p.part_dy[i] = acc.sum_dy;
    p.part_dy_xmu[i] = acc.sum_dy_xmu;
  }

  static __device__ __forceinline__ Acc load_partial(const Params& p, int64_t i) {
    return Acc{p.part_dy[i], p.part_dy_xmu[i]};
  }
};

// Fills `work` ([5, G * C] opmath, or [2, G * C] without grad_input):
// sum_dy, sum_dy_xmu * invstd, then a, k, d.
template <typename scalar_t>
void ghost_backward_sums(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& var,
    const ParamRef& weight,
    double eps,
    const GhostGeometry& shape,
    GhostLayout layout,
    bool compute_grad_input,
    at::Tensor& work,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  using Op = GradSumsOp<T>;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  T* w = work.mutable_data_ptr<T>();
  typename Op::Params params{
      mean.const_data_ptr<T>(),
      var.const_data_ptr<T>(),
      weight,
      static_cast<T>(eps),
      shape,
      w,
      w + pairs,
      compute_grad_input ? w + 2 * pairs : nullptr,
      compute_grad_input ? w + 3 * pairs : nullptr,
      compute_grad_input ? w + 4 * pairs : nullptr,
      nullptr,
      nullptr};
  at::Tensor partials;  // see ghost_statistics on its lifetime
  const auto alloc_partials = [&](typename Op::Params& p, int64_t count) {
    partials = at::empty({2 * count}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
    p.part_dy = partials.mutable_data_ptr<T>();
    p.part_dy_xmu = p.part_dy + count;
  };
  run_reduction<Op, scalar_t>(
      x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), params, shape, layout, alloc_partials, stream);
}

// ---------------------------------------------------------------------------
// Gradients (CPU: ghost_grad_input, grad_coefficients)
// ---------------------------------------------------------------------------

// grad_bias[c] = sum over g of sum_dy[g, c], grad_weight[c] = sum over g of
// sum_dy_xmu[g, c] * invstd[g, c], ghosts in index order (as the CPU), one
// thread per channel; written in the gradient tensors' dtype.
template <typename T>
__global__ void __launch_bounds__(kChannelThreads) ghost_grad_affine_kernel(
    const T* __restrict__ sum_dy,
    const T* __restrict__ weight_term,
    void* grad_weight,
    void* grad_bias,
    Element kind,
    int64_t num_ghosts,
    int64_t channels) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += stride) {
    T gw = T(0);
    T gb = T(0);
    for (int64_t g = 0; g < num_ghosts; ++g) {
      gw += weight_term[g * channels + c];
      gb += sum_dy[g * channels + c];
    }
    store_element(grad_weight, kind, c, gw);
    store_element(grad_bias, kind, c, gb);
  }
}

template <typename scalar_t>
void ghost_grad_affine(
    const at::Tensor& work,
    const GhostGeometry& shape,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  const T* sum_dy = work.const_data_ptr<T>();
  const T* weight_term = sum_dy + shape.num_ghosts * shape.channels;
  const int64_t grid = std::min(ceil_div(shape.channels, kChannelThreads), kMaxGrid);
  ghost_grad_affine_kernel<T><<<static_cast<unsigned>(grid), kChannelThreads, 0, stream>>>(
      sum_dy, weight_term, grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(),
      element_of(grad_weight.scalar_type()), shape.num_ghosts, shape.channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void ghost_grad_input(
    const at::Tensor& dy,
    const at::Tensor& x,
    at::Tensor& grad_input,
    const at::Tensor& work,
    const GhostGeometry& shape,
    GhostLayout layout,
    c10::DeviceIndex device,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  const T* a = work.const_data_ptr<T>() + 2 * pairs;
  run_apply<scalar_t, true>(
      grad_input.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), a,
      a + pairs, a + 2 * pairs, shape, layout, device, stream);
}

// ---------------------------------------------------------------------------
// Running statistics (CPU: ghost_update_running_stats)
// ---------------------------------------------------------------------------

// One thread per channel: ghost::update_running_channel, the CPU's formulas.
// steps_before comes from num_batches_tracked on the device: no host read,
// so the update can be captured in a CUDA graph.
template <typename T>
__global__ void __launch_bounds__(kChannelThreads) ghost_update_running_stats_kernel(
    void* running_mean,
    void* running_var,
    Element kind,
    const int64_t* __restrict__ num_batches_tracked,
    const T* __restrict__ mean,
    const T* __restrict__ var,
    GhostGeometry geo,  // spatial = sample_numel
    bool has_momentum,
    double momentum,
    bool average_ghosts) {
  const int64_t steps_before = *num_batches_tracked;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < geo.channels; c += stride) {
    T rm = load_element<T>(running_mean, kind, c);
    T rv = load_element<T>(running_var, kind, c);
    update_running_channel(rm, rv, mean, var, c, geo, steps_before, has_momentum, momentum, average_ghosts);
    store_element(running_mean, kind, c, rm);
    store_element(running_var, kind, c, rv);
  }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    int64_t ghost_batch_size,
    double eps) {
  const GhostGeometry geometry = validate_ghost_batch_norm_args(input, weight, bias, ghost_batch_size, eps);
  if (input.numel() == 0) {
    return empty_ghost_batch_norm(input, geometry);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const c10::DeviceIndex device = input.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const GhostGeometry& shape = geometry;

  const at::Tensor x = aligned_16(input.contiguous(ghost_memory_format(input)));
  at::Tensor output = at::empty_like(x);
  const auto stats_options = x.options().dtype(ghost_stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({shape.num_ghosts, shape.channels}, stats_options);
  at::Tensor var = at::empty({shape.num_ghosts, shape.channels}, stats_options);
  // scale and shift per (ghost, channel); the stats dtype is the opmath type.
  at::Tensor scale_shift = at::empty({2 * shape.num_ghosts * shape.channels}, stats_options);
  at::Tensor weight_c, bias_c;
  const ParamRef weight_ref = param_ref(weight, weight_c);
  const ParamRef bias_ref = param_ref(bias, bias_c);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_batch_norm_cuda", [&] {
    static_assert(
        std::is_same_v<at::opmath_type<scalar_t>, std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>,
        "the statistics dtype (ghost_stats_dtype) must be the opmath type");
    ghost_statistics<scalar_t>(x, shape, geometry.layout, mean, var, scale_shift, weight_ref, bias_ref, eps, stream);
    ghost_normalize<scalar_t>(x, output, scale_shift, shape, geometry.layout, device, stream);
  });
  return {output, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t ghost_batch_size,
    double eps,
    bool compute_grad_input) {
  const GhostGeometry geometry =
      validate_ghost_batch_norm_backward_args(grad_output, input, weight, mean, var, ghost_batch_size, eps);
  if (input.numel() == 0) {
    return empty_ghost_batch_norm_backward(input, weight, mean, geometry, compute_grad_input);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const c10::DeviceIndex device = input.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const GhostGeometry& shape = geometry;

  const auto format = ghost_memory_format(input);
  const at::Tensor x = aligned_16(input.contiguous(format));
  const at::Tensor dy = aligned_16(grad_output.contiguous(format));
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor var_c = var.contiguous();
  const bool has_weight = weight.has_value() && weight->defined();
  const auto param_options = has_weight ? weight->options() : mean.options();
  at::Tensor grad_weight = at::empty({shape.channels}, param_options);
  at::Tensor grad_bias = at::empty({shape.channels}, param_options);
  at::Tensor grad_input = compute_grad_input ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor weight_c;
  const ParamRef weight_ref = param_ref(weight, weight_c);
  const int64_t pairs = shape.num_ghosts * shape.channels;
  at::Tensor work = at::empty({(compute_grad_input ? 5 : 2) * pairs}, mean.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_batch_norm_backward_cuda", [&] {
    ghost_backward_sums<scalar_t>(
        dy, x, mean_c, var_c, weight_ref, eps, shape, geometry.layout, compute_grad_input, work, stream);
    ghost_grad_affine<scalar_t>(work, shape, grad_weight, grad_bias, stream);
    if (compute_grad_input) {
      ghost_grad_input<scalar_t>(dy, x, grad_input, work, shape, geometry.layout, device, stream);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

void ghost_batch_norm_update_stats_cuda(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t batch_size,
    int64_t ghost_batch_size,
    int64_t sample_numel,
    std::optional<double> momentum,
    bool average_ghosts) {
  // spatial carries sample_numel (a ghost's values per channel = samples * sample_numel).
  const GhostGeometry shape = validate_ghost_update_stats_args(
      running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel, momentum);
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(mean.device().index()).stream();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor var_c = var.contiguous();
  const int64_t grid = std::min(ceil_div(shape.channels, kChannelThreads), kMaxGrid);
  // An empty batch (or no channels, whose zero-block grid would be a launch
  // error) updates nothing but still counts, as on the CPU.
  if (updates_running_stats(shape)) {
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "ghost_batch_norm_update_stats_cuda", [&] {
      ghost_update_running_stats_kernel<scalar_t><<<static_cast<unsigned>(grid), kChannelThreads, 0, stream>>>(
          running_mean.mutable_data_ptr(), running_var.mutable_data_ptr(), element_of(running_mean.scalar_type()),
          num_batches_tracked.const_data_ptr<int64_t>(), mean_c.const_data_ptr<scalar_t>(),
          var_c.const_data_ptr<scalar_t>(), shape, momentum.has_value(), momentum.value_or(0.0), average_ghosts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Queued after the kernel on the same stream: the kernel read the old count.
  num_batches_tracked.add_(average_ghosts ? 1 : shape.num_ghosts);
}

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) {
  m.impl("ghost_batch_norm", &ghost_batch_norm_cuda);
  m.impl("ghost_batch_norm_backward", &ghost_batch_norm_backward_cuda);
  m.impl("ghost_batch_norm_update_stats_", &ghost_batch_norm_update_stats_cuda);
}

}  // namespace ghost
}  // namespace swa_fast
