// The elementwise passes of ghost batch norm's CUDA kernels: the forward's
// y = x * scale + shift and the backward's dx = a * dy - k * x + d, with
// per-(ghost, channel) coefficients, in one grid-stride kernel that carries
// each element's (ghost, channel) by additions (no per-element division).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "cuda/ghost_bn_common.cuh"
#include "cuda/vector_access.cuh"
#include "rounding.h"

namespace swa_fast {
namespace ghost {

// ---------------------------------------------------------------------------
// Normalization (CPU: ghost_normalize)
// ---------------------------------------------------------------------------

// Element e of the dense layout written as mixed-radix digits below the
// ghost index g: ChannelsFirst e = ((g * ghost + n) * C + c) * S + s has
// digits (s, c, n) with radices (S, C, ghost); ChannelsLast
// e = ((g * ghost + n) * S + s) * C + c has (c, s, n) with (C, S, ghost).
// Every ghost but the last has exactly `ghost` samples and the last ends the
// tensor, so this holds for all e < numel.
struct ApplyGeometry {
  int64_t numel;
  int64_t channels;
  int64_t radix0, radix1, radix2;
  int64_t step;  // elements per grid-stride step
  int64_t step0, step1, step2, step_ghost;
};

inline ApplyGeometry make_apply_geometry(const GhostGeometry& shape, GhostLayout layout, int64_t step) {
  ApplyGeometry geo;
  geo.numel = shape.batch * shape.channels * shape.spatial;
  geo.channels = shape.channels;
  const bool channels_first = layout == GhostLayout::ChannelsFirst;
  geo.radix0 = channels_first ? shape.spatial : shape.channels;
  geo.radix1 = channels_first ? shape.channels : shape.spatial;
  geo.radix2 = shape.ghost_size;
  geo.step = step;
  int64_t rest = step;
  geo.step0 = rest % geo.radix0;
  rest /= geo.radix0;
  geo.step1 = rest % geo.radix1;
  rest /= geo.radix1;
  geo.step2 = rest % geo.radix2;
  geo.step_ghost = rest / geo.radix2;
  return geo;
}

// out = x * coef0 + coef1 (normalize) or out = coef0 * dy - coef1 * x + coef2
// (grad input), coefficients per (ghost, channel) in opmath. A unit of kVec
// elements lies in one row (S % kVec == 0, resp. C % kVec == 0): one
// (ghost, channel) for ChannelsFirst, kVec consecutive channels of one ghost
// for ChannelsLast.
template <typename scalar_t, int kVec, bool kChannelsLast, bool kGrad>
__global__ void __launch_bounds__(kApplyThreads) ghost_apply_kernel(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    const at::opmath_type<scalar_t>* __restrict__ coef0,
    const at::opmath_type<scalar_t>* __restrict__ coef1,
    const at::opmath_type<scalar_t>* __restrict__ coef2,
    ApplyGeometry geo) {
  using T = at::opmath_type<scalar_t>;
  int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (e >= geo.numel) {
    return;
  }
  int64_t rest = e;
  int64_t d0 = rest % geo.radix0;
  rest /= geo.radix0;
  int64_t d1 = rest % geo.radix1;
  rest /= geo.radix1;
  int64_t d2 = rest % geo.radix2;
  int64_t g = rest / geo.radix2;
  for (; e < geo.numel; e += geo.step) {
    const int64_t i = g * geo.channels + (kChannelsLast ? d0 : d1);
    T xs[kVec];
    T ds[kVec];
    T ys[kVec];
    vec::load_converted<kVec>(x, e, xs);
    if constexpr (kGrad) {
      vec::load_converted<kVec>(dy, e, ds);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t ik = kChannelsLast ? i + k : i;
      if constexpr (kGrad) {
        // (a*dy - k*x) + d with each product rounded on its own, written out so
        // that no compiler contraction can change the bits.
        ys[k] = (mul_rn(coef0[ik], ds[k]) - mul_rn(coef1[ik], xs[k])) + coef2[ik];
      } else {
        ys[k] = fma_rn(xs[k], coef0[ik], coef1[ik]);  // the CPU's fmadd(x, scale, shift)
      }
    }
    vec::store_converted<kVec>(out, e, ys);
    // Add the step digit by digit; each digit overflows by less than its
    // radix, so one carry at most.
    d0 += geo.step0;
    const int64_t carry0 = d0 >= geo.radix0 ? 1 : 0;
    d0 -= carry0 * geo.radix0;
    d1 += geo.step1 + carry0;
    const int64_t carry1 = d1 >= geo.radix1 ? 1 : 0;
    d1 -= carry1 * geo.radix1;
    d2 += geo.step2 + carry1;
    const int64_t carry2 = d2 >= geo.radix2 ? 1 : 0;
    d2 -= carry2 * geo.radix2;
    g += geo.step_ghost + carry2;
  }
}

// Launches ghost_apply_kernel with as many blocks as the GPU holds at once
// (or fewer for small tensors); the rest is grid-stride.
template <typename scalar_t, bool kGrad>
void run_apply(
    scalar_t* out,
    const scalar_t* x,
    const scalar_t* dy,
    const at::opmath_type<scalar_t>* coef0,
    const at::opmath_type<scalar_t>* coef1,
    const at::opmath_type<scalar_t>* coef2,
    const GhostGeometry& shape,
    GhostLayout layout,
    c10::DeviceIndex device,
    cudaStream_t stream) {
  constexpr int kWide = vec::kVectorWidth<scalar_t>;
  const int64_t run = layout == GhostLayout::ChannelsFirst ? shape.spatial : shape.channels;
  const bool vectorize = run % kWide == 0;
  TORCH_INTERNAL_ASSERT(
      is_aligned_16(out) && is_aligned_16(x) && (!kGrad || is_aligned_16(dy)), "ghost BN tensors not aligned");
  const auto launch = [&](auto vec_tag, auto layout_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    constexpr bool kChannelsLast = decltype(layout_tag)::value;
    const auto kernel = ghost_apply_kernel<scalar_t, kVec, kChannelsLast, kGrad>;
    const int64_t resident = static_cast<int64_t>(blocks_per_sm(reinterpret_cast<const void*>(kernel), kApplyThreads,
                                                                device)) *
        multiprocessor_count(device);
    const int64_t units = shape.batch * shape.channels * shape.spatial / kVec;
    const int64_t grid = std::max<int64_t>(1, std::min(ceil_div(units, kApplyThreads), resident));
    const ApplyGeometry geo = make_apply_geometry(shape, layout, grid * kApplyThreads * kVec);
    kernel<<<static_cast<unsigned>(grid), kApplyThreads, 0, stream>>>(out, x, dy, coef0, coef1, coef2, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto with_layout = [&](auto vec_tag) {
    if (layout == GhostLayout::ChannelsLast) {
      launch(vec_tag, std::true_type{});
    } else {
      launch(vec_tag, std::false_type{});
    }
  };
  if (vectorize) {
    with_layout(std::integral_constant<int, kWide>{});
  } else {
    with_layout(std::integral_constant<int, 1>{});
  }
}

}  // namespace ghost
}  // namespace swa_fast
