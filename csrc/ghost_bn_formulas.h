// The per-(ghost, channel) formulas of ghost batch normalization, written once
// for the CPU and CUDA kernels (SWA_FAST_HOST_DEVICE): the affine coefficients
// of the forward, the gradient coefficients of the backward and the
// running-statistics update. Both kernels call these same functions, with the
// rounding spelled out (rounding.h), so they agree by construction; only the
// reductions that produce the sums and the per-element passes differ.
#pragma once

#include <cstdint>

#include "ghost_bn_args.h"  // GhostGeometry
#include "host_device.h"
#include "rounding.h"

namespace swa_fast {
namespace ghost {

// 1 / sqrt(var + eps).
template <typename T>
SWA_FAST_HOST_DEVICE T inverse_std(T var, T eps) {
  return T(1) / sqrt_rn(var + eps);
}

// The forward as y = x * scale + shift: scale = weight * invstd, shift =
// bias - mean * scale (weight 1, bias 0 without affine).
template <typename T>
struct Affine {
  T scale;
  T shift;
};

template <typename T>
SWA_FAST_HOST_DEVICE Affine<T> affine_coefficients(T mean, T var, T weight, T bias, T eps) {
  const T scale = weight * inverse_std(var, eps);
  return Affine<T>{scale, fma_rn(-mean, scale, bias)};
}

// The backward of one (ghost, channel) of n values from its sums of dy and
// dy * (x - mean): dx = a * dy - k * x + d with a = weight * invstd,
// k = a * invstd^2 * sum_dy_xmu / n, d = k * mean - a * sum_dy / n; its share
// of grad_weight is sum_dy_xmu * invstd (of grad_bias, sum_dy).
template <typename T>
struct GradCoefficients {
  T a;
  T k;
  T d;
  T weight_term;
};

template <typename T>
SWA_FAST_HOST_DEVICE GradCoefficients<T> grad_coefficients(T mean, T var, T sum_dy, T sum_dy_xmu, T weight, T eps,
                                                           T n) {
  const T invstd = inverse_std(var, eps);
  const T a = weight * invstd;
  const T k = a * invstd * invstd * sum_dy_xmu / n;
  return GradCoefficients<T>{a, k, fma_rn(k, mean, -(a * sum_dy / n)), sum_dy_xmu * invstd};
}

// One step of a running statistic: factor * value + (1 - factor) * running.
template <typename T>
SWA_FAST_HOST_DEVICE T running_step(T running, T value, T factor) {
  return fma_rn(factor, value, (T(1) - factor) * running);
}

// Channel c's running mean and variance after one batch, from the per-ghost
// biased statistics mean/var ([G, C]): the unbiased variance n / (n - 1) of
// each ghost (n = its samples x geo.spatial, the values per channel) is what
// is stored. Per ghost: one step each, in ghost order (what F.batch_norm on
// each chunk in turn leaves); average_ghosts: one step with the ghost-size-
// weighted mean of the ghosts' means and unbiased variances. The factor is
// `momentum`, or 1 / step (a cumulative average) without one, where step
// counts num_batches_tracked after each increment from steps_before.
template <typename T>
SWA_FAST_HOST_DEVICE void update_running_channel(T& running_mean, T& running_var, const T* mean, const T* var,
                                                 int64_t c, const GhostGeometry& geo, int64_t steps_before,
                                                 bool has_momentum, double momentum, bool average_ghosts) {
  const int64_t C = geo.channels;
  T mean_sum = T(0);
  T var_sum = T(0);
  for (int64_t g = 0; g < geo.num_ghosts; ++g) {
    const int64_t samples = geo.ghost_samples(g);
    const T n = static_cast<T>(samples * geo.spatial);
    const T unbiased = var[g * C + c] * n / (n - T(1));
    if (average_ghosts) {
      mean_sum += static_cast<T>(samples) * mean[g * C + c];
      var_sum += static_cast<T>(samples) * unbiased;
    } else {
      const T f = has_momentum ? static_cast<T>(momentum) : T(1) / static_cast<T>(steps_before + g + 1);
      running_mean = running_step(running_mean, mean[g * C + c], f);
      running_var = running_step(running_var, unbiased, f);
    }
  }
  if (average_ghosts) {
    const T f = has_momentum ? static_cast<T>(momentum) : T(1) / static_cast<T>(steps_before + 1);
    const T total = static_cast<T>(geo.batch);
    running_mean = running_step(running_mean, mean_sum / total, f);
    running_var = running_step(running_var, var_sum / total, f);
  }
}

}  // namespace ghost
}  // namespace swa_fast
