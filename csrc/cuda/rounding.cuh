// Correctly rounded arithmetic shared by the CUDA kernels. The explicit
// intrinsics pin down the rounding whatever nvcc's contraction settings:
// torch's CUDA lerp is compiled with nvcc's default contraction, which turns
// `a + w*(b-a)` and `b - (b-a)*(1-w)` into one fma each; __fmul_rn keeps a
// product (x*x for moments) from being fused into a later add; sqrt_rn is
// the correctly rounded sqrt the CPU's std::sqrt gives.
#pragma once

namespace swa_fast {

__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
__device__ __forceinline__ double fma_rn(double a, double b, double c) {
  return __fma_rn(a, b, c);
}
__device__ __forceinline__ float sqrt_rn(float v) {
  return __fsqrt_rn(v);
}
__device__ __forceinline__ double sqrt_rn(double v) {
  return __dsqrt_rn(v);
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

}  // namespace swa_fast
