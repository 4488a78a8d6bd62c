// 16-byte vector access for the CUDA kernels: the multi-tensor harness's
// functors (average, distance) and ghost batch norm read and write through
// these. 16 bytes is the widest load a thread can issue; it is also what the
// caching allocator's alignment guarantees for a tensor at storage offset 0.
#pragma once

#include <cstdint>

namespace swa_fast {
namespace vec {

constexpr int kVectorBytes = 16;

// Elements of T per 16-byte vector: the ILP of a vectorized loop.
template <typename T>
constexpr int kVectorWidth = kVectorBytes / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <int kAlignment>
__host__ __device__ __forceinline__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kAlignment == 0;
}

// Vector i of p, i.e. elements [i * N, i * N + N); p must be aligned to
// sizeof(T) * N (check with is_aligned first).
template <int N, typename T>
__device__ __forceinline__ AlignedVector<T, N> load_vector(const T* p, int64_t i) {
  return reinterpret_cast<const AlignedVector<T, N>*>(p)[i];
}

template <int N, typename T>
__device__ __forceinline__ void store_vector(T* p, int64_t i, const AlignedVector<T, N>& v) {
  reinterpret_cast<AlignedVector<T, N>*>(p)[i] = v;
}

// kVec consecutive elements at p + offset, converted to T (the arithmetic
// type): one 16-byte load when kVec > 1 (p + offset must then be aligned to
// the vector), one scalar load when kVec == 1.
template <int kVec, typename scalar_t, typename T>
__device__ __forceinline__ void load_converted(const scalar_t* p, int64_t offset, T* out) {
  if constexpr (kVec == 1) {
    out[0] = static_cast<T>(p[offset]);
  } else {
    const auto v = *reinterpret_cast<const AlignedVector<scalar_t, kVec>*>(p + offset);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out[k] = static_cast<T>(v.val[k]);
    }
  }
}

// The store matching load_converted: kVec values of T rounded to scalar_t.
template <int kVec, typename scalar_t, typename T>
__device__ __forceinline__ void store_converted(scalar_t* p, int64_t offset, const T* values) {
  if constexpr (kVec == 1) {
    p[offset] = static_cast<scalar_t>(values[0]);
  } else {
    AlignedVector<scalar_t, kVec> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v.val[k] = static_cast<scalar_t>(values[k]);
    }
    *reinterpret_cast<AlignedVector<scalar_t, kVec>*>(p + offset) = v;
  }
}

}  // namespace vec
}  // namespace swa_fast
