// Pieces every ghost batch norm CUDA kernel uses: launch constants, the
// alignment rule, device facts, and access to the per-channel tensors
// (weight, bias, running statistics, gradients) of any floating dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/vector_access.cuh"
#include "ghost_bn_args.h"

namespace swa_fast {
namespace ghost {

// Elementwise passes and the per-channel kernels.
constexpr int kApplyThreads = 256;
constexpr int kChannelThreads = 256;
// Grid-stride loops cover any task count; grids stay well below the 2^31 - 1
// limit of gridDim.x (only gridDim.x is ever used).
constexpr int64_t kMaxGrid = int64_t{1} << 20;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t next_power_of_two(int64_t v) {
  int64_t p = 1;
  while (p < v) {
    p *= 2;
  }
  return p;
}

inline bool is_aligned_16(const void* p) {
  return vec::is_aligned<vec::kVectorBytes>(p);
}

// `t` itself when its data starts on a 16-byte boundary, else a copy in fresh
// (aligned) memory with the same layout. Dense views at odd storage offsets
// are rare; copying them keeps every kernel on its one, vectorized order, so
// the bits never depend on where a tensor starts.
inline at::Tensor aligned_16(const at::Tensor& t) {
  return is_aligned_16(t.const_data_ptr()) ? t : t.clone(at::MemoryFormat::Preserve);
}

// Streaming multiprocessors of a device, queried once (a driver attribute
// read, not a stream operation: allowed during graph capture).
inline int multiprocessor_count(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto index = static_cast<size_t>(device);
  if (counts.size() <= index) {
    counts.resize(index + 1, 0);
  }
  if (counts[index] == 0) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
    counts[index] = std::max(1, value);
  }
  return counts[index];
}

// Blocks of `kernel` that fit on one SM at `threads` threads a block, asked
// of the driver once per (kernel, device) instead of on every launch.
inline int blocks_per_sm(const void* kernel, int threads, c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, c10::DeviceIndex>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto found = cache.find(key);
  if (found != cache.end()) {
    return found->second;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  per_sm = std::max(1, per_sm);
  cache.emplace(key, per_sm);
  return per_sm;
}

// ---------------------------------------------------------------------------
// Per-channel tensors of any floating dtype
// ---------------------------------------------------------------------------

// Per-channel tensors (weight, bias, running stats, grad weight/bias) may
// have another floating dtype than the input, and weight and bias may even
// differ from each other (fp32 weight, bf16 bias for bf16 input). They are
// tiny and touched once per (ghost, channel) at most, so their dtype is a
// runtime tag instead of more template instantiations.
enum class Element : int { Float, Double, Half, BFloat16 };

inline Element element_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::Float:
      return Element::Float;
    case at::ScalarType::Double:
      return Element::Double;
    case at::ScalarType::Half:
      return Element::Half;
    case at::ScalarType::BFloat16:
      return Element::BFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "swa_fast ghost batch norm: no CUDA access for ", dtype, " (checks missed it)");
  }
  return Element::Float;
}

template <typename T>
__device__ __forceinline__ T load_element(const void* p, Element kind, int64_t i) {
  switch (kind) {
    case Element::Double:
      return static_cast<T>(static_cast<const double*>(p)[i]);
    case Element::Half:
      return static_cast<T>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case Element::BFloat16:
      return static_cast<T>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case Element::Float:
    default:
      return static_cast<T>(static_cast<const float*>(p)[i]);
  }
}

// As static_cast<param_t>(value) on the CPU: double -> float -> half/bf16.
template <typename T>
__device__ __forceinline__ void store_element(void* p, Element kind, int64_t i, T value) {
  switch (kind) {
    case Element::Double:
      static_cast<double*>(p)[i] = static_cast<double>(value);
      break;
    case Element::Half:
      static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(value));
      break;
    case Element::BFloat16:
      static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(value));
      break;
    case Element::Float:
    default:
      static_cast<float*>(p)[i] = static_cast<float>(value);
      break;
  }
}

// An optional per-channel parameter: ptr == nullptr when absent.
struct ParamRef {
  const void* ptr;
  Element kind;

  template <typename T>
  __device__ __forceinline__ T get(int64_t c, T absent) const {
    return ptr == nullptr ? absent : load_element<T>(ptr, kind, c);
  }
};

// The caller keeps `contiguous` alive while kernels run (they index c * 1).
inline ParamRef param_ref(const std::optional<at::Tensor>& param, at::Tensor& contiguous) {
  if (!param.has_value() || !param->defined()) {
    return ParamRef{nullptr, Element::Float};
  }
  contiguous = param->contiguous();
  return ParamRef{contiguous.const_data_ptr(), element_of(contiguous.scalar_type())};
}


}  // namespace ghost
}  // namespace swa_fast
