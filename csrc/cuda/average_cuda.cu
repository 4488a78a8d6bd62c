// CUDA kernels of average_, average_moments_ and nonfinite_flag.
//
// Structure (mirrors csrc/cpu/average_cpu.cpp section by section):
//   1. check_average_args validates everything on the host;
//   2. the tensor pairs are grouped by (averaged dtype, current dtype) and
//      each group goes through multi_tensor_apply (multi_tensor_apply.cuh):
//      fixed-size chunks, one CUDA block per chunk, many tensors per launch;
//   3. each chunk runs LerpFunctor<avg_t, cur_t, kMoments>, which converts to
//      the arithmetic type (fp32, fp64 for fp64) in registers and applies
//      torch's lerp formula, with 16-byte vector accesses where aligned.
//
// Unlike the CPU kernels, the host never reads weight or skip: every thread
// reads them from device memory, so an update costs no sync and can be
// captured in a CUDA graph.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "average_args.h"
#include "dtypes.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/tensor_groups.h"
#include "rounding.h"  // fma_rn, mul_rn

namespace swa_fast {
namespace {

// ---------------------------------------------------------------------------
// torch's lerp formula (CPU: lerp_in_place)
// ---------------------------------------------------------------------------

// torch's lerp (ATen/native/Lerp.h) for one weight, written like the CPU
// kernel's: w < 0.5 ? fma(w, b-a, a) : fma(w-1, b-a, b). w - 1 == -(1 - w)
// exactly, so the second form equals torch's fused b - (b-a)*(1-w).
template <typename opmath_t>
struct Lerp {
  opmath_t coeff;  // w, or w - 1 for large weights
  bool small;      // |w| < 0.5: start from a, else from b

  __device__ __forceinline__ explicit Lerp(opmath_t w)
      : coeff(fabs(w) < opmath_t(0.5) ? w : w - opmath_t(1)), small(fabs(w) < opmath_t(0.5)) {}

  __device__ __forceinline__ opmath_t operator()(opmath_t a, opmath_t b) const {
    return fma_rn(coeff, b - a, small ? a : b);
  }
};

// The weight arrives as a 0-dim float32 or float64 tensor; reading it as
// double first keeps "w == 1" the exact test the CPU kernel makes.
__device__ __forceinline__ double read_weight(const void* weight, bool weight_is_double) {
  return weight_is_double ? *static_cast<const double*>(weight)
                          : static_cast<double>(*static_cast<const float*>(weight));
}

__device__ __forceinline__ bool should_skip(const bool* skip) {
  return skip != nullptr && *skip;
}

// ---------------------------------------------------------------------------
// One chunk of one tensor pair, plus squares for moments (CPU: lerp_chunk,
// copy_chunk)
// ---------------------------------------------------------------------------

// Lists: {averaged, current}, or {mean, sq_mean, current} for moments.
// weight == 1 is an exact copy, as torch's first AveragedModel update is,
// even when current holds Inf.
template <typename avg_t, typename cur_t, bool kMoments>
struct LerpFunctor {
  using opmath_t = at::opmath_type<avg_t>;
  static constexpr int kDepth = kMoments ? 3 : 2;
  static constexpr int kCur = kDepth - 1;
  static constexpr int kILP = vec::kVectorWidth<avg_t>;

  const void* weight;
  bool weight_is_double;
  const bool* skip;  // nullptr: never skip

  __device__ __forceinline__ void operator()(const mta::Chunk<kDepth>& chunk) const {
    if (should_skip(skip)) {
      return;
    }
    const double w = read_weight(weight, weight_is_double);
    const bool copy = w == 1.0;
    const Lerp<opmath_t> lerp(static_cast<opmath_t>(w));

    avg_t* avg = chunk.template ptr<avg_t>(0);
    avg_t* sq = kMoments ? chunk.template ptr<avg_t>(1) : nullptr;
    const cur_t* cur = chunk.template ptr<cur_t>(kCur);

    // One element; s is only touched for moments.
    const auto update = [&](avg_t& a, avg_t& s, cur_t c) {
      const opmath_t x = static_cast<opmath_t>(c);
      a = copy ? static_cast<avg_t>(x) : static_cast<avg_t>(lerp(static_cast<opmath_t>(a), x));
      if constexpr (kMoments) {
        // x*x rounded once in the arithmetic type, never to fp16/bf16 first
        // (see average_moments_'s schema comment): exactly sq.lerp_(x*x, w)
        // for fp32/fp64, and no overflow of the square for |x| > 256 in fp16.
        const opmath_t x2 = mul_rn(x, x);
        s = copy ? static_cast<avg_t>(x2) : static_cast<avg_t>(lerp(static_cast<opmath_t>(s), x2));
      }
    };

    const bool aligned = vec::is_aligned<vec::kVectorBytes>(avg) &&
        vec::is_aligned<kILP * sizeof(cur_t)>(cur) && (!kMoments || vec::is_aligned<vec::kVectorBytes>(sq));
    mta::for_each_in_chunk<kILP>(
        chunk.size, aligned,
        [&](int v) {
          auto a = vec::load_vector<kILP>(avg, v);
          const auto c = vec::load_vector<kILP>(cur, v);
          vec::AlignedVector<avg_t, kILP> s;
          if constexpr (kMoments) {
            s = vec::load_vector<kILP>(sq, v);
          }
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            update(a.val[k], s.val[k], c.val[k]);
          }
          vec::store_vector(avg, v, a);
          if constexpr (kMoments) {
            vec::store_vector(sq, v, s);
          }
        },
        [&](int i) {
          avg_t a = avg[i];
          avg_t s;
          if constexpr (kMoments) {
            s = sq[i];
          }
          update(a, s, cur[i]);
          avg[i] = a;
          if constexpr (kMoments) {
            sq[i] = s;
          }
        });
  }
};

// Integer and bool tensors (e.g. BatchNorm's num_batches_tracked) are copied.
// Only the element size matters, so all of them share four instantiations,
// and they obey skip like the floating tensors (a cudaMemcpyAsync could not).
template <typename word_t>
struct CopyFunctor {
  static constexpr int kILP = vec::kVectorWidth<word_t>;

  const bool* skip;

  __device__ __forceinline__ void operator()(const mta::Chunk<2>& chunk) const {
    if (should_skip(skip)) {
      return;
    }
    word_t* dst = chunk.template ptr<word_t>(0);
    const word_t* src = chunk.template ptr<word_t>(1);
    const bool aligned = vec::is_aligned<vec::kVectorBytes>(dst) && vec::is_aligned<vec::kVectorBytes>(src);
    mta::for_each_in_chunk<kILP>(
        chunk.size, aligned, [&](int v) { vec::store_vector(dst, v, vec::load_vector<kILP>(src, v)); },
        [&](int i) { dst[i] = src[i]; });
  }
};

// ---------------------------------------------------------------------------
// Grouping by dtype and dispatch (CPU: run_chunk, split_into_chunks)
// ---------------------------------------------------------------------------

// Calls f(TypeTag<avg_t>{}, TypeTag<cur_t>{}) for the floating pairs
// is_supported_dtype_pair accepts (the same dtype, or a lower-precision
// current into fp32/fp64); only these are compiled.
template <typename F>
void dispatch_floating_pair(const char* op, at::ScalarType avg, at::ScalarType cur, F&& f) {
  dispatch_kernel_float(op, avg, [&](auto avg_tag) {
    using avg_t = typename decltype(avg_tag)::type;
    dispatch_kernel_float(op, cur, [&](auto cur_tag) {
      using cur_t = typename decltype(cur_tag)::type;
      constexpr int kAvg = float_rank_of<avg_t>();
      constexpr int kCur = float_rank_of<cur_t>();
      if constexpr (std::is_same_v<avg_t, cur_t> || (kAvg >= 2 && kCur < kAvg)) {
        f(avg_tag, cur_tag);
      } else {
        TORCH_CHECK(false, op, ": averaging ", cur, " into ", avg, " is not implemented on CUDA");
      }
    });
  });
}

// One launch group: (averaged dtype, current dtype); integer groups are keyed
// by element size (copy_key).
using Group = TensorGroup<std::pair<at::ScalarType, at::ScalarType>>;

// Copies only care about the element size: integer and bool tensors are
// grouped under one representative dtype per size (bool and uint8 share a
// launch, as do int64 and uint64).
at::ScalarType copy_key(at::ScalarType dtype) {
  switch (c10::elementSize(dtype)) {
    case 1:
      return at::ScalarType::Byte;
    case 2:
      return at::ScalarType::Short;
    case 4:
      return at::ScalarType::Int;
    case 8:
      return at::ScalarType::Long;
    default:
      return dtype;
  }
}

// A dtype without a kernel here (float8, sub-byte types) raises before any
// group is launched, so no call leaves the lists half updated.
void check_group_has_kernel(const char* op, const Group& group) {
  const at::ScalarType avg_dtype = group.key.first;
  const at::ScalarType cur_dtype = group.key.second;
  if (at::isFloatingType(avg_dtype)) {
    dispatch_floating_pair(op, avg_dtype, cur_dtype, [](auto, auto) {});
    return;
  }
  const size_t size = c10::elementSize(avg_dtype);
  TORCH_CHECK(
      size == 1 || size == 2 || size == 4 || size == 8, op, ": copying ", avg_dtype,
      " tensors is not implemented on CUDA");
}

template <bool kMoments>
void run_group(const char* op, const Group& group, const at::Tensor& weight, const bool* skip) {
  const at::ScalarType avg_dtype = group.key.first;
  const at::ScalarType cur_dtype = group.key.second;
  if (!at::isFloatingType(avg_dtype)) {
    TORCH_INTERNAL_ASSERT(!kMoments, op, ": moments of a non-floating tensor passed the argument checks");
    // Integer groups are keyed by element size (see copy_key).
    switch (c10::elementSize(avg_dtype)) {
      case 1:
        return mta::multi_tensor_apply<2>(group.lists, 1, CopyFunctor<uint8_t>{skip});
      case 2:
        return mta::multi_tensor_apply<2>(group.lists, 1, CopyFunctor<uint16_t>{skip});
      case 4:
        return mta::multi_tensor_apply<2>(group.lists, 1, CopyFunctor<uint32_t>{skip});
      case 8:
        return mta::multi_tensor_apply<2>(group.lists, 1, CopyFunctor<uint64_t>{skip});
      default:
        TORCH_INTERNAL_ASSERT(false, op, ": no copy kernel for ", avg_dtype, " (check_group_has_kernel)");
    }
  }
  const void* weight_ptr = weight.const_data_ptr();
  const bool weight_is_double = weight.scalar_type() == at::ScalarType::Double;
  dispatch_floating_pair(op, avg_dtype, cur_dtype, [&](auto avg_tag, auto cur_tag) {
    using avg_t = typename decltype(avg_tag)::type;
    using cur_t = typename decltype(cur_tag)::type;
    using Functor = LerpFunctor<avg_t, cur_t, kMoments>;
    mta::multi_tensor_apply<Functor::kDepth>(group.lists, kMoments ? 2 : 1, Functor{weight_ptr, weight_is_double, skip});
  });
}

// ---------------------------------------------------------------------------
// average_ / average_moments_ (CPU: average_cpu_impl)
// ---------------------------------------------------------------------------

template <bool kMoments>
void average_cuda_impl(
    const char* op,
    at::TensorList averaged,
    at::TensorList sq_mean,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  const std::vector<at::Tensor> cur = check_average_args(op, averaged, sq_mean, kMoments, current, weight, skip);
  if (averaged.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(averaged[0].device());
  const bool* skip_ptr = skip.has_value() ? skip->const_data_ptr<bool>() : nullptr;

  std::vector<Group> groups;
  for (size_t i = 0; i < averaged.size(); ++i) {
    const at::ScalarType avg_dtype = averaged[i].scalar_type();
    const auto key = at::isFloatingType(avg_dtype) ? std::make_pair(avg_dtype, cur[i].scalar_type())
                                                   : std::make_pair(copy_key(avg_dtype), copy_key(avg_dtype));
    const auto position = static_cast<int64_t>(i);
    if constexpr (kMoments) {
      add_to_group(groups, key, position, {averaged[i], sq_mean[i], cur[i]});
    } else {
      add_to_group(groups, key, position, {averaged[i], cur[i]});
    }
  }
  for (const Group& group : groups) {
    check_group_has_kernel(op, group);
  }
  for (const Group& group : groups) {
    run_group<kMoments>(op, group, weight, skip_ptr);
  }
}

void average_cuda(
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  average_cuda_impl<false>("swa_fast.average_", averaged, {}, current, weight, skip);
}

void average_moments_cuda(
    at::TensorList mean,
    at::TensorList sq_mean,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  average_cuda_impl<true>("swa_fast.average_moments_", mean, sq_mean, current, weight, skip);
}

// ---------------------------------------------------------------------------
// nonfinite_flag (CPU: block_has_nonfinite, nonfinite_flag_cpu)
// ---------------------------------------------------------------------------

// Any thread that sees NaN/Inf stores true. Many threads storing the same
// value is a benign race with a deterministic result, and needs no atomics.
template <typename T>
struct NonfiniteFunctor {
  static constexpr int kILP = vec::kVectorWidth<T>;

  bool* flag;

  __device__ __forceinline__ void operator()(const mta::Chunk<1>& chunk) const {
    using opmath_t = at::opmath_type<T>;
    const T* values = chunk.template ptr<T>(0);
    bool found = false;
    mta::for_each_in_chunk<kILP>(
        chunk.size, vec::is_aligned<vec::kVectorBytes>(values),
        [&](int v) {
          const auto x = vec::load_vector<kILP>(values, v);
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            found |= !isfinite(static_cast<opmath_t>(x.val[k]));
          }
        },
        [&](int i) { found |= !isfinite(static_cast<opmath_t>(values[i])); });
    if (found) {
      *flag = true;
    }
  }
};

at::Tensor nonfinite_flag_cuda(at::TensorList tensors) {
  const c10::Device device = check_nonfinite_args(tensors);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor flag = tensors[0].new_empty({}, at::TensorOptions().dtype(at::kBool).device(device));
  C10_CUDA_CHECK(
      cudaMemsetAsync(flag.mutable_data_ptr(), 0, sizeof(bool), c10::cuda::getCurrentCUDAStream(device.index())));

  std::vector<std::vector<std::vector<at::Tensor>>> by_dtype;  // one depth-1 list per dtype
  std::vector<at::ScalarType> dtypes;
  for (const at::Tensor& t : nonfinite_inputs(tensors)) {
    size_t g = 0;
    while (g < dtypes.size() && dtypes[g] != t.scalar_type()) {
      ++g;
    }
    if (g == dtypes.size()) {
      dtypes.push_back(t.scalar_type());
      by_dtype.emplace_back(1);
    }
    by_dtype[g][0].push_back(t);
  }
  bool* flag_ptr = flag.mutable_data_ptr<bool>();
  for (size_t g = 0; g < dtypes.size(); ++g) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes[g], "swa_fast_nonfinite", [&] {
      mta::multi_tensor_apply<1>(by_dtype[g], 0, NonfiniteFunctor<scalar_t>{flag_ptr});
    });
  }
  return flag;
}

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) {
  m.impl("average_", &average_cuda);
  m.impl("average_moments_", &average_moments_cuda);
  m.impl("nonfinite_flag", &nonfinite_flag_cuda);
}

}  // namespace swa_fast
