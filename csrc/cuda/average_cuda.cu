// CUDA kernels of average_, average_moments_, multi_average_, swag_moments_, average_stochastic_ and
// nonfinite_flag.
//
// Structure (mirrors csrc/cpu/average_cpu.cpp section by section):
//   1. check_average_args / check_multi_average_args / check_swag_args validate everything on the host;
//   2. the tensor pairs are grouped by (averaged dtype, current dtype) and
//      each group goes through multi_tensor_apply (multi_tensor_apply.cuh):
//      fixed-size chunks, one CUDA block per chunk, many tensors per launch;
//   3. each chunk runs LerpFunctor<avg_t, cur_t, kMoments> (or, for two or
//      more averages of each tensor, MultiLerpFunctor<avg_t, cur_t, kDepth>),
//      which converts to the arithmetic type (fp32, fp64 for fp64) in
//      registers and applies torch's lerp formula, with 16-byte vector
//      accesses where aligned (swag_moments_: SwagFunctor, the same lerp plus
//      the centred variance and the deviation).
//
// Unlike the CPU kernels, the host never reads weights or skip: every thread
// reads them from device memory, so an update costs no sync and can be
// captured in a CUDA graph.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
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
#include "stochastic_rounding.h"

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

  Lerp() = default;  // for arrays of them (MultiLerpFunctor), each assigned before use
  __device__ __forceinline__ explicit Lerp(opmath_t w)
      : coeff(fabs(w) < opmath_t(0.5) ? w : w - opmath_t(1)), small(fabs(w) < opmath_t(0.5)) {}

  __device__ __forceinline__ opmath_t operator()(opmath_t a, opmath_t b) const {
    return with_difference(a, b, b - a);
  }

  // The same, given d = b - a already rounded (swag_moments_ reuses its d).
  __device__ __forceinline__ opmath_t with_difference(opmath_t a, opmath_t b, opmath_t d) const {
    return fma_rn(coeff, d, small ? a : b);
  }
};

// The weight arrives as a float32 or float64 tensor (element `index` of it);
// reading it as double first keeps "w == 1" the exact test the CPU kernel makes.
__device__ __forceinline__ double read_weight(const void* weight, bool weight_is_double, int64_t index = 0) {
  return weight_is_double ? static_cast<const double*>(weight)[index]
                          : static_cast<double>(static_cast<const float*>(weight)[index]);
}

// One element of one average, torch's lerp_(a, x, w) with x in the arithmetic
// type; `copy` (w == 1) stores x exactly, even when it is Inf.
template <typename avg_t, typename opmath_t>
__device__ __forceinline__ avg_t lerp_element(avg_t a, opmath_t x, bool copy, const Lerp<opmath_t>& lerp) {
  return copy ? static_cast<avg_t>(x) : static_cast<avg_t>(lerp(static_cast<opmath_t>(a), x));
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
      a = lerp_element(a, x, copy, lerp);
      if constexpr (kMoments) {
        // x*x rounded once in the arithmetic type, never to fp16/bf16 first
        // (see average_moments_'s schema comment): exactly sq.lerp_(x*x, w)
        // for fp32/fp64, and no overflow of the square for |x| > 256 in fp16.
        const opmath_t x2 = mul_rn(x, x);
        s = lerp_element(s, x2, copy, lerp);
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

// Two or more averages of each current tensor (multi_average_), from one read
// of it. Lists: the averages of this pass in slots 0..count-1, then, up to
// slot kDepth - 2, current's address again (never touched; it fills the
// depth bucket, see multi_depth), and current last. Every element of current
// is loaded (vector loads where every pointer is aligned) and converted once,
// then updates each average with lerp_element, exactly as LerpFunctor does
// for one: average k is bitwise what average_ with weights[k] gives.
template <typename avg_t, typename cur_t, int kDepth>
struct MultiLerpFunctor {
  using opmath_t = at::opmath_type<avg_t>;
  static constexpr int kSlots = kDepth - 1;  // averages one launch can carry
  static constexpr int kUsed = 2;  // slots every launch uses (count >= 2): no runtime test for them
  static constexpr int kCur = kDepth - 1;
  static constexpr int kILP = vec::kVectorWidth<avg_t>;

  const void* weights;  // the pass's first weight
  int64_t weight_stride;  // elements between consecutive weights
  bool weights_are_double;
  int count;  // averages in this pass, 2..kSlots
  const bool* skip;  // nullptr: never skip

  __device__ __forceinline__ void operator()(const mta::Chunk<kDepth>& chunk) const {
    if (should_skip(skip)) {
      return;
    }
    const cur_t* cur = chunk.template ptr<cur_t>(kCur);
    avg_t* avg[kSlots];
    bool copy[kSlots];
    Lerp<opmath_t> lerp[kSlots];
    bool aligned = vec::is_aligned<kILP * sizeof(cur_t)>(cur);
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      if (k < kUsed || k < count) {
        const double w = read_weight(weights, weights_are_double, k * weight_stride);
        copy[k] = w == 1.0;
        lerp[k] = Lerp<opmath_t>(static_cast<opmath_t>(w));
        avg[k] = chunk.template ptr<avg_t>(k);
        aligned = aligned && vec::is_aligned<vec::kVectorBytes>(avg[k]);
      }
    }
    mta::for_each_in_chunk<kILP>(
        chunk.size, aligned,
        [&](int v) {
          const auto c = vec::load_vector<kILP>(cur, v);
          opmath_t x[kILP];
#pragma unroll
          for (int e = 0; e < kILP; ++e) {
            x[e] = static_cast<opmath_t>(c.val[e]);
          }
#pragma unroll
          for (int k = 0; k < kSlots; ++k) {
            if (k < kUsed || k < count) {
              auto a = vec::load_vector<kILP>(avg[k], v);
#pragma unroll
              for (int e = 0; e < kILP; ++e) {
                a.val[e] = lerp_element(a.val[e], x[e], copy[k], lerp[k]);
              }
              vec::store_vector(avg[k], v, a);
            }
          }
        },
        [&](int i) {
          const opmath_t x = static_cast<opmath_t>(cur[i]);
#pragma unroll
          for (int k = 0; k < kSlots; ++k) {
            if (k < kUsed || k < count) {
              avg[k][i] = lerp_element(avg[k][i], x, copy[k], lerp[k]);
            }
          }
        });
  }
};

// Integer and bool tensors (e.g. BatchNorm's num_batches_tracked) are copied,
// from the last list into the first `count` (1 for average_; up to
// kDepth - 1 for multi_average_, whose further slots hold the source's
// address and are not touched). Only the element size matters, so all of
// them share one instantiation per size and depth, and they obey skip like
// the floating tensors (a cudaMemcpyAsync could not).
template <typename word_t, int kDepth = 2>
struct CopyFunctor {
  static constexpr int kILP = vec::kVectorWidth<word_t>;
  static constexpr int kSlots = kDepth - 1;
  static constexpr int kUsed = 1;  // slots every launch uses (count >= 1): no runtime test for them

  const bool* skip;
  int count = 1;

  __device__ __forceinline__ void operator()(const mta::Chunk<kDepth>& chunk) const {
    if (should_skip(skip)) {
      return;
    }
    const word_t* src = chunk.template ptr<word_t>(kDepth - 1);
    word_t* dst[kSlots];
    bool aligned = vec::is_aligned<vec::kVectorBytes>(src);
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      if (k < kUsed || k < count) {
        dst[k] = chunk.template ptr<word_t>(k);
        aligned = aligned && vec::is_aligned<vec::kVectorBytes>(dst[k]);
      }
    }
    mta::for_each_in_chunk<kILP>(
        chunk.size, aligned,
        [&](int v) {
          const auto values = vec::load_vector<kILP>(src, v);
#pragma unroll
          for (int k = 0; k < kSlots; ++k) {
            if (k < kUsed || k < count) {
              vec::store_vector(dst[k], v, values);
            }
          }
        },
        [&](int i) {
          const word_t value = src[i];
#pragma unroll
          for (int k = 0; k < kSlots; ++k) {
            if (k < kUsed || k < count) {
              dst[k][i] = value;
            }
          }
        });
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

// A copy group (keyed by element size, see copy_key) of depth kDepth: its
// first `count` lists are written from the last one.
template <int kDepth>
void run_copy_group(const char* op, const Group& group, int count, const bool* skip) {
  const at::ScalarType dtype = group.key.first;
  switch (c10::elementSize(dtype)) {
    case 1:
      return mta::multi_tensor_apply<kDepth>(group.lists, count, CopyFunctor<uint8_t, kDepth>{skip, count});
    case 2:
      return mta::multi_tensor_apply<kDepth>(group.lists, count, CopyFunctor<uint16_t, kDepth>{skip, count});
    case 4:
      return mta::multi_tensor_apply<kDepth>(group.lists, count, CopyFunctor<uint32_t, kDepth>{skip, count});
    case 8:
      return mta::multi_tensor_apply<kDepth>(group.lists, count, CopyFunctor<uint64_t, kDepth>{skip, count});
    default:
      TORCH_INTERNAL_ASSERT(false, op, ": no copy kernel for ", dtype, " (check_group_has_kernel)");
  }
}

// One average per tensor (average_, average_moments_, and a multi_average_
// pass of one average): `weight` points at the weight in device memory.
template <bool kMoments>
void run_group(const char* op, const Group& group, const void* weight, bool weight_is_double, const bool* skip) {
  const at::ScalarType avg_dtype = group.key.first;
  const at::ScalarType cur_dtype = group.key.second;
  if (!at::isFloatingType(avg_dtype)) {
    TORCH_INTERNAL_ASSERT(!kMoments, op, ": moments of a non-floating tensor passed the argument checks");
    return run_copy_group<2>(op, group, 1, skip);
  }
  dispatch_floating_pair(op, avg_dtype, cur_dtype, [&](auto avg_tag, auto cur_tag) {
    using avg_t = typename decltype(avg_tag)::type;
    using cur_t = typename decltype(cur_tag)::type;
    using Functor = LerpFunctor<avg_t, cur_t, kMoments>;
    mta::multi_tensor_apply<Functor::kDepth>(group.lists, kMoments ? 2 : 1, Functor{weight, weight_is_double, skip});
  });
}

// ---------------------------------------------------------------------------
// multi_average_'s passes and depth buckets (CPU: average_lists_cpu)
// ---------------------------------------------------------------------------

// The most averages one launch carries: every list the harness allows but
// current's.
constexpr int kMaxAveragesPerPass = mta::kMaxDepth - 1;

// Few depths, so few kernels to compile: the depth of the launches of a pass
// of `count` averages (2..8) is 3, 5 or 9; the slots beyond `count` carry
// current's address and are not touched. (One average uses LerpFunctor,
// depth 2, as average_ does; copies always use kMaxDepth.)
constexpr int multi_depth(int count) {
  return count <= 2 ? 3 : count <= 4 ? 5 : mta::kMaxDepth;
}
static_assert(multi_depth(kMaxAveragesPerPass) == mta::kMaxDepth, "the deepest bucket must carry 8 averages");

// The weights in device memory: weights[k] is element k * stride of data.
struct DeviceWeights {
  const void* data;
  int64_t stride;
  bool is_double;

  // The weights from weights[k] on.
  DeviceWeights from(int64_t k) const {
    const int64_t bytes = k * stride * static_cast<int64_t>(is_double ? sizeof(double) : sizeof(float));
    return {static_cast<const char*>(data) + bytes, stride, is_double};
  }
};

template <int kDepth>
void run_multi_lerp_group(const char* op, const Group& group, int count, const DeviceWeights& w, const bool* skip) {
  dispatch_floating_pair(op, group.key.first, group.key.second, [&](auto avg_tag, auto cur_tag) {
    using Functor = MultiLerpFunctor<typename decltype(avg_tag)::type, typename decltype(cur_tag)::type, kDepth>;
    mta::multi_tensor_apply<kDepth>(group.lists, count, Functor{w.data, w.stride, w.is_double, count, skip});
  });
}

// One pass: averages first .. first + count - 1 of every current tensor.
// Its groups' lists are built with the depth run_multi_group expects.
std::vector<Group> multi_pass_groups(
    at::TensorList averaged,
    const std::vector<at::Tensor>& cur,
    int64_t first,
    int count) {
  const auto n = static_cast<int64_t>(cur.size());
  std::vector<Group> groups;
  std::vector<at::Tensor> row;
  for (int64_t i = 0; i < n; ++i) {
    const at::ScalarType avg_dtype = averaged[i].scalar_type();
    const bool floating = at::isFloatingType(avg_dtype);
    const auto key = floating ? std::make_pair(avg_dtype, cur[i].scalar_type())
                              : std::make_pair(copy_key(avg_dtype), copy_key(avg_dtype));
    const int depth = count == 1 ? 2 : floating ? multi_depth(count) : mta::kMaxDepth;
    row.assign(static_cast<size_t>(depth), cur[i]);  // unused slots and the last one: current
    for (int k = 0; k < count; ++k) {
      row[k] = averaged[(first + k) * n + i];
    }
    add_to_group(groups, key, i, row);
  }
  return groups;
}

// One group of a pass of `count` averages whose weights start at w.data.
void run_multi_group(const char* op, const Group& group, int count, const DeviceWeights& w, const bool* skip) {
  if (count == 1) {
    return run_group<false>(op, group, w.data, w.is_double, skip);  // exactly average_'s launch
  }
  if (!at::isFloatingType(group.key.first)) {
    return run_copy_group<mta::kMaxDepth>(op, group, count, skip);
  }
  switch (group.lists.size()) {
    case multi_depth(2):
      return run_multi_lerp_group<multi_depth(2)>(op, group, count, w, skip);
    case multi_depth(4):
      return run_multi_lerp_group<multi_depth(4)>(op, group, count, w, skip);
    case multi_depth(kMaxAveragesPerPass):
      return run_multi_lerp_group<multi_depth(kMaxAveragesPerPass)>(op, group, count, w, skip);
    default:
      TORCH_INTERNAL_ASSERT(false, op, ": no kernel for ", group.lists.size(), " lists");
  }
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
    run_group<kMoments>(
        op, group, weight.const_data_ptr(), weight.scalar_type() == at::ScalarType::Double, skip_ptr);
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

// K averages of each tensor in passes of at most kMaxAveragesPerPass: one
// pass (one read of current) for K <= 8; each further pass reads current
// again. All groups of all passes are checked before the first launch.
void multi_average_cuda(
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& skip) {
  const char* op = "swa_fast.multi_average_";
  const std::vector<at::Tensor> cur = check_multi_average_args(op, averaged, current, weights, skip);
  if (cur.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(averaged[0].device());
  const bool* skip_ptr = skip.has_value() ? skip->const_data_ptr<bool>() : nullptr;
  const DeviceWeights w{weights.const_data_ptr(), weights.stride(0), weights.scalar_type() == at::ScalarType::Double};
  const int64_t total = weights.numel();

  struct Pass {
    int64_t first;  // its first average
    int count;  // its averages, 1..kMaxAveragesPerPass
    std::vector<Group> groups;
  };
  std::vector<Pass> passes;
  for (int64_t first = 0; first < total; first += kMaxAveragesPerPass) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxAveragesPerPass, total - first));
    passes.push_back({first, count, multi_pass_groups(averaged, cur, first, count)});
  }
  for (const Pass& pass : passes) {
    for (const Group& group : pass.groups) {
      check_group_has_kernel(op, group);
    }
  }
  for (const Pass& pass : passes) {
    for (const Group& group : pass.groups) {
      run_multi_group(op, group, pass.count, w.from(pass.first), skip_ptr);
    }
  }
}

// ---------------------------------------------------------------------------
// swag_moments_ (CPU: swag_in_place, swag_chunk, swag_lists_cpu, swag_moments_cpu)
// ---------------------------------------------------------------------------

// One SWAG step on one element in the arithmetic type, the CPU kernel's
// swag_in_place with the rounding written out (see swag_moments_'s schema
// comment, csrc/average_args.cpp): with d = x - m,
//     m'  = lerp(m, x, w)            LerpFunctor's lerp_element on the same d: average_'s bits
//     v'  = (1 - w) * fma(w * d, d, v)
//     dev = x - m'
// the weighted Welford recurrence (for w = 1/(n+1) the exact population
// variance update var_{n+1} = (1-w)(var_n + w d^2); for any w in [0, 1] the
// exponentially weighted variance, West 1979). mul_rn keeps w * d and the
// final product from being contracted into anything; the fma is explicit.
template <typename opmath_t>
struct SwagStep {
  Lerp<opmath_t> lerp;
  opmath_t w;
  opmath_t keep;  // 1 - w, rounded once
  bool copy;      // w == 1: the mean is an exact copy of x, as average_'s

  __device__ __forceinline__ explicit SwagStep(double weight)
      : lerp(static_cast<opmath_t>(weight)),
        w(static_cast<opmath_t>(weight)),
        keep(opmath_t(1) - static_cast<opmath_t>(weight)),
        copy(weight == 1.0) {}

  // m and v in, m' and v' out; returns the deviation x - m'.
  __device__ __forceinline__ opmath_t operator()(opmath_t x, opmath_t& m, opmath_t& v) const {
    const opmath_t d = x - m;
    const opmath_t mean = copy ? x : lerp.with_difference(m, x, d);
    v = mul_rn(keep, fma_rn(mul_rn(w, d), d, v));
    m = mean;
    return x - mean;
  }
};

// Lists: {mean, variance, deviation, current} (depth 4), or {mean, variance,
// current} (depth 3) without deviation. Each element of current is loaded and
// converted once; the three results are rounded once to the averages' dtype.
template <typename avg_t, typename cur_t, bool kDeviation>
struct SwagFunctor {
  using opmath_t = at::opmath_type<avg_t>;
  static constexpr int kDepth = kDeviation ? 4 : 3;
  static constexpr int kCur = kDepth - 1;
  static constexpr int kILP = vec::kVectorWidth<avg_t>;

  const void* weight;
  bool weight_is_double;
  const bool* skip;  // nullptr: never skip

  __device__ __forceinline__ void operator()(const mta::Chunk<kDepth>& chunk) const {
    if (should_skip(skip)) {
      return;
    }
    const SwagStep<opmath_t> step(read_weight(weight, weight_is_double));

    avg_t* mean = chunk.template ptr<avg_t>(0);
    avg_t* var = chunk.template ptr<avg_t>(1);
    avg_t* dev = kDeviation ? chunk.template ptr<avg_t>(2) : nullptr;
    const cur_t* cur = chunk.template ptr<cur_t>(kCur);

    // One element; e is only written with kDeviation.
    const auto update = [&](avg_t& m, avg_t& v, avg_t& e, cur_t c) {
      opmath_t new_m = static_cast<opmath_t>(m);
      opmath_t new_v = static_cast<opmath_t>(v);
      const opmath_t deviation = step(static_cast<opmath_t>(c), new_m, new_v);
      m = static_cast<avg_t>(new_m);
      v = static_cast<avg_t>(new_v);
      if constexpr (kDeviation) {
        e = static_cast<avg_t>(deviation);
      }
    };

    const bool aligned = vec::is_aligned<vec::kVectorBytes>(mean) && vec::is_aligned<vec::kVectorBytes>(var) &&
        (!kDeviation || vec::is_aligned<vec::kVectorBytes>(dev)) && vec::is_aligned<kILP * sizeof(cur_t)>(cur);
    mta::for_each_in_chunk<kILP>(
        chunk.size, aligned,
        [&](int v) {
          auto m = vec::load_vector<kILP>(mean, v);
          auto s = vec::load_vector<kILP>(var, v);
          const auto c = vec::load_vector<kILP>(cur, v);
          vec::AlignedVector<avg_t, kILP> e;
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            update(m.val[k], s.val[k], e.val[k], c.val[k]);
          }
          vec::store_vector(mean, v, m);
          vec::store_vector(var, v, s);
          if constexpr (kDeviation) {
            vec::store_vector(dev, v, e);
          }
        },
        [&](int i) {
          avg_t m = mean[i];
          avg_t s = var[i];
          avg_t e;
          update(m, s, e, cur[i]);
          mean[i] = m;
          var[i] = s;
          if constexpr (kDeviation) {
            dev[i] = e;
          }
        });
  }
};

template <bool kDeviation>
void run_swag_group(const char* op, const Group& group, const void* weight, bool weight_is_double, const bool* skip) {
  dispatch_floating_pair(op, group.key.first, group.key.second, [&](auto avg_tag, auto cur_tag) {
    using Functor = SwagFunctor<typename decltype(avg_tag)::type, typename decltype(cur_tag)::type, kDeviation>;
    mta::multi_tensor_apply<Functor::kDepth>(
        group.lists, Functor::kDepth - 1, Functor{weight, weight_is_double, skip});
  });
}

// Grouped by (averages' dtype, current's dtype), every group checked before
// the first launch; weight and skip stay on the device (no host read).
void swag_moments_cuda(
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  const char* op = "swa_fast.swag_moments_";
  const std::vector<at::Tensor> cur = check_swag_args(op, mean, variance, deviation, current, weight, skip);
  if (mean.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(mean[0].device());
  const bool* skip_ptr = skip.has_value() ? skip->const_data_ptr<bool>() : nullptr;
  const bool with_deviation = !deviation.empty();

  std::vector<Group> groups;
  for (size_t i = 0; i < mean.size(); ++i) {
    const auto key = std::make_pair(mean[i].scalar_type(), cur[i].scalar_type());
    const auto position = static_cast<int64_t>(i);
    if (with_deviation) {
      add_to_group(groups, key, position, {mean[i], variance[i], deviation[i], cur[i]});
    } else {
      add_to_group(groups, key, position, {mean[i], variance[i], cur[i]});
    }
  }
  for (const Group& group : groups) {
    check_group_has_kernel(op, group);
  }
  const void* weight_ptr = weight.const_data_ptr();
  const bool weight_is_double = weight.scalar_type() == at::ScalarType::Double;
  for (const Group& group : groups) {
    if (with_deviation) {
      run_swag_group<true>(op, group, weight_ptr, weight_is_double, skip_ptr);
    } else {
      run_swag_group<false>(op, group, weight_ptr, weight_is_double, skip_ptr);
    }
  }
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

// ---------------------------------------------------------------------------
// average_stochastic_ (CPU: stochastic_chunk, stochastic_streams,
// average_stochastic_cpu)
// ---------------------------------------------------------------------------

// A float16/bfloat16 average of one (averaged dtype, current dtype) group:
// LerpFunctor's lerp in float32 (weight == 1: x itself), then each value
// rounded with its element's word (stochastic_rounding.h). The stream is the
// pair's index in the group (chunk.tensor), the element its index in the
// tensor (chunk.begin + i): the words the CPU kernel draws. Lists: {averaged,
// current}. The counter is read on the device.
template <typename avg_t, typename cur_t>
struct StochasticLerpFunctor {
  static constexpr int kDepth = 2;
  static constexpr int kILP = vec::kVectorWidth<avg_t>;

  const void* weight;
  bool weight_is_double;
  const int64_t* counter;
  uint64_t seed;
  const bool* skip;  // nullptr: never skip

  __device__ __forceinline__ void operator()(const mta::Chunk<kDepth>& chunk) const {
    if (should_skip(skip)) {
      return;
    }
    const double w = read_weight(weight, weight_is_double);
    const bool copy = w == 1.0;
    const Lerp<float> lerp(static_cast<float>(w));
    const stochastic::Key key{seed, static_cast<uint64_t>(*counter)};

    avg_t* avg = chunk.template ptr<avg_t>(0);
    const cur_t* cur = chunk.template ptr<cur_t>(1);

    // Element i of the chunk: element chunk.begin + i of the tensor.
    const auto update = [&](avg_t& a, cur_t c, uint32_t word) {
      const float x = static_cast<float>(c);
      const float r = copy ? x : lerp(static_cast<float>(a), x);
      a = stochastic::round_stochastically<avg_t>(r, word);
    };

    const bool aligned = vec::is_aligned<vec::kVectorBytes>(avg) && vec::is_aligned<kILP * sizeof(cur_t)>(cur);
    mta::for_each_in_chunk<kILP>(
        chunk.size, aligned,
        [&](int v) {
          auto a = vec::load_vector<kILP>(avg, v);
          const auto c = vec::load_vector<kILP>(cur, v);
          // A thread's kILP consecutive elements share their groups' Philox
          // calls (one per four elements, as the CPU's block_words) when
          // they start a group, as they do in every chunk (chunks and
          // vectors are multiples of four elements); the word indices are
          // then compile-time, so the words stay in registers.
          const int64_t first = chunk.begin + static_cast<int64_t>(v) * kILP;
          if (kILP % 4 == 0 && first % 4 == 0) {
#pragma unroll
            for (int g = 0; g < kILP / 4; ++g) {
              const stochastic::Words words = stochastic::group_words(key, chunk.tensor, (first >> 2) + g);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                update(a.val[4 * g + j], c.val[4 * g + j], words.w[j]);
              }
            }
          } else {
#pragma unroll
            for (int k = 0; k < kILP; ++k) {
              update(a.val[k], c.val[k], stochastic::element_word(key, chunk.tensor, first + k));
            }
          }
          vec::store_vector(avg, v, a);
        },
        [&](int i) {
          avg_t a = avg[i];
          update(a, cur[i], stochastic::element_word(key, chunk.tensor, chunk.begin + i));
          avg[i] = a;
        });
  }
};

// Calls f(TypeTag<avg_t>{}, TypeTag<cur_t>{}) for the float16/bfloat16
// averages is_stochastic_dtype_pair accepts (current float16, bfloat16 or
// float32); only these are compiled.
template <typename F>
void dispatch_stochastic_pair(const char* op, at::ScalarType avg, at::ScalarType cur, F&& f) {
  dispatch_kernel_float(op, avg, [&](auto avg_tag) {
    using avg_t = typename decltype(avg_tag)::type;
    dispatch_kernel_float(op, cur, [&](auto cur_tag) {
      using cur_t = typename decltype(cur_tag)::type;
      if constexpr (float_rank_of<avg_t>() == 1 && float_rank_of<cur_t>() <= 2) {
        f(avg_tag, cur_tag);
      } else {
        TORCH_CHECK(false, op, ": stochastic rounding of ", cur, " into ", avg, " is not implemented on CUDA");
      }
    });
  });
}

void average_stochastic_cuda(
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const at::Tensor& counter,
    int64_t seed,
    const std::optional<at::Tensor>& skip) {
  const char* op = "swa_fast.average_stochastic_";
  const std::vector<at::Tensor> cur = check_stochastic_args(op, averaged, current, weight, counter, skip);
  if (averaged.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(averaged[0].device());
  const bool* skip_ptr = skip.has_value() ? skip->const_data_ptr<bool>() : nullptr;
  const bool weight_is_double = weight.scalar_type() == at::ScalarType::Double;

  // Groups as average_'s: a group's tensor index is the pair's stream.
  std::vector<Group> groups;
  for (size_t i = 0; i < averaged.size(); ++i) {
    const at::ScalarType avg_dtype = averaged[i].scalar_type();
    const auto key = at::isFloatingType(avg_dtype) ? std::make_pair(avg_dtype, cur[i].scalar_type())
                                                   : std::make_pair(copy_key(avg_dtype), copy_key(avg_dtype));
    add_to_group(groups, key, static_cast<int64_t>(i), {averaged[i], cur[i]});
  }
  for (const Group& group : groups) {
    if (is_reduced_float(group.key.first)) {
      dispatch_stochastic_pair(op, group.key.first, group.key.second, [](auto, auto) {});
    } else {
      check_group_has_kernel(op, group);
    }
  }
  for (const Group& group : groups) {
    if (!is_reduced_float(group.key.first)) {  // float32/float64 or a copy: exactly average_'s launch
      run_group<false>(op, group, weight.const_data_ptr(), weight_is_double, skip_ptr);
      continue;
    }
    dispatch_stochastic_pair(op, group.key.first, group.key.second, [&](auto avg_tag, auto cur_tag) {
      using Functor = StochasticLerpFunctor<typename decltype(avg_tag)::type, typename decltype(cur_tag)::type>;
      mta::multi_tensor_apply<Functor::kDepth>(
          group.lists, 1,
          Functor{weight.const_data_ptr(), weight_is_double, counter.const_data_ptr<int64_t>(),
                  static_cast<uint64_t>(seed), skip_ptr});
    });
  }
}

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) {
  m.impl("average_", &average_cuda);
  m.impl("average_moments_", &average_moments_cuda);
  m.impl("multi_average_", &multi_average_cuda);
  m.impl("swag_moments_", &swag_moments_cuda);
  m.impl("average_stochastic_", &average_stochastic_cuda);
  m.impl("nonfinite_flag", &nonfinite_flag_cuda);
}

}  // namespace swa_fast
