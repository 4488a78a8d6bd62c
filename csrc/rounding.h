// Correctly rounded arithmetic with the rounding written out, for code shared
// by the CPU and CUDA kernels (and the CUDA kernels' own formulas). The
// explicit forms pin down the rounding whatever a compiler's contraction
// settings: torch's CUDA lerp is compiled with nvcc's default contraction,
// which turns `a + w*(b-a)` and `b - (b-a)*(1-w)` into one fma each, and g++
// may contract `a*b + c` too; mul_rn keeps a product (x*x for moments) from
// being fused into a later add; sqrt_rn is the correctly rounded square root
// on both (std::sqrt is; nvcc's default sqrt is too, the intrinsic says so).
#pragma once

#include <cmath>

#include "host_device.h"

namespace swa_fast {

SWA_FAST_HOST_DEVICE float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SWA_FAST_HOST_DEVICE double fma_rn(double a, double b, double c) {
#ifdef __CUDA_ARCH__
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SWA_FAST_HOST_DEVICE float sqrt_rn(float v) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(v);
#else
  return std::sqrt(v);
#endif
}

SWA_FAST_HOST_DEVICE double sqrt_rn(double v) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(v);
#else
  return std::sqrt(v);
#endif
}

SWA_FAST_HOST_DEVICE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  // A plain product: g++ may still fuse it into an add it feeds once inlined,
  // so shared code writes the fma it means with fma_rn instead.
  return a * b;
#endif
}

SWA_FAST_HOST_DEVICE double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace swa_fast
