// Marks functions that both the CPU kernels (g++) and the CUDA kernels (nvcc)
// call, so one definition serves both and their results agree by construction.
#pragma once

#if defined(__CUDACC__)
#define SWA_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SWA_FAST_HOST_DEVICE inline
#endif
