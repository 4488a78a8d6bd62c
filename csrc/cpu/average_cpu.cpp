// CPU kernels of average_, average_moments_, multi_average_, swag_moments_, average_stochastic_ and
// nonfinite_flag.
//
// Structure (mirrored by csrc/cuda/average_cuda.cu):
//   1. check_average_args / check_multi_average_args / check_swag_args validate everything on the host;
//   2. the whole list is cut into fixed-size chunks (cpu::kChunk elements, cpu/chunks.h), each
//      chunk one unit of at::parallel_for work, so one huge tensor and many
//      tiny ones load the threads evenly;
//   3. each chunk runs lerp_chunk<avg_t, cur_t, kMoments>, which converts
//      current to the arithmetic type (fp32, fp64 for fp64) in small stack
//      blocks, once for all the averages of it (multi_average_ has K), and
//      applies torch's lerp formula with at::vec::Vectorized (swag_moments_:
//      swag_chunk, the same blocks and the same lerp, plus the centred variance
//      and the deviation).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "average_args.h"
#include "cpu/chunks.h"
#include "cpu/stochastic_block.h"
#include "cpu/vec_load.h"
#include "dtypes.h"

namespace swa_fast {
namespace {

using cpu::Chunk;
using cpu::split_into_chunks;

constexpr int64_t kBlock = 512;  // elements per stack conversion buffer

// torch's lerp (ATen/native/Lerp.h), with the same fused multiply-add that
// torch's vectorized CPU kernel uses, so the results match torch.lerp bit for
// bit: w < 0.5 ? a + w*(b-a) : b - (b-a)*(1-w).
template <typename T>
void lerp_in_place(T* a, const T* b, int64_t n, T w) {
  using Vec = at::vec::Vectorized<T>;
  const bool small = std::abs(w) < T(0.5);
  const Vec coeff(small ? w : w - T(1));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec va = Vec::loadu(a + i);
    const Vec vb = Vec::loadu(b + i);
    at::vec::fmadd(coeff, vb - va, small ? va : vb).store(a + i);
  }
  if (i < n) {  // the tail runs the same vector formula on a partial vector
    const int count = static_cast<int>(n - i);
    const Vec va = Vec::loadu(a + i, count);
    const Vec vb = Vec::loadu(b + i, count);
    at::vec::fmadd(coeff, vb - va, small ? va : vb).store(a + i, count);
  }
}

// x*x in the arithmetic type, rounded once there (never to fp16/bf16: see
// average_moments_'s schema comment).
template <typename T>
void square_in_place(T* x, int64_t n) {
  at::vec::map([](auto v) { return v * v; }, x, x, n);
}

// One 512-element block of one average: avg[0..n) = lerp(avg, x, weight),
// with x already in the arithmetic type. weight == 1 is an exact copy, as
// torch's first AveragedModel update is, even when x holds Inf.
template <typename avg_t, typename opmath_t>
void lerp_block(avg_t* avg, const opmath_t* x, int64_t n, double weight, opmath_t* buffer) {
  if (weight == 1.0) {
    at::vec::convert(x, avg, n);
    return;
  }
  opmath_t* a = load_as(avg, buffer, n);
  lerp_in_place(a, x, n, static_cast<opmath_t>(weight));
  store_from(a, avg, n);
}

// One chunk [begin, end) of one current tensor and the `count` averages of it
// (avg[k] with weights[k]; one for average_ and average_moments_), plus the
// squares for moments. Each block of current is converted to the arithmetic
// type once and then updates every average: one read of current for all of
// them.
template <typename avg_t, typename cur_t, bool kMoments>
void lerp_chunk(
    void* const* avg,
    const double* weights,
    int64_t count,
    avg_t* sq,
    const cur_t* cur,
    int64_t begin,
    int64_t end) {
  using opmath_t = at::opmath_type<avg_t>;
  opmath_t avg_buffer[kBlock];
  opmath_t cur_buffer[kBlock];
  opmath_t square_buffer[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const opmath_t* x = load_as(cur + start, cur_buffer, n);
    for (int64_t k = 0; k < count; ++k) {
      lerp_block(static_cast<avg_t*>(avg[k]) + start, x, n, weights[k], avg_buffer);
    }
    if constexpr (kMoments) {
      std::memcpy(square_buffer, x, n * sizeof(opmath_t));
      square_in_place(square_buffer, n);
      lerp_block(sq + start, square_buffer, n, weights[0], avg_buffer);
    }
  }
}

// Integer and bool tensors (e.g. BatchNorm's num_batches_tracked) are copied,
// into every average.
void copy_chunk(void* const* dst, int64_t count, const at::Tensor& src, int64_t begin, int64_t end) {
  const int64_t item = src.element_size();
  const char* from = static_cast<const char*>(src.const_data_ptr()) + begin * item;
  for (int64_t k = 0; k < count; ++k) {
    std::memcpy(static_cast<char*>(dst[k]) + begin * item, from, (end - begin) * item);
  }
}

template <bool kMoments>
void run_chunk(
    at::ScalarType avg_dtype,
    void* const* avg,
    const double* weights,
    int64_t count,
    const at::Tensor& sq,
    const at::Tensor& cur,
    int64_t begin,
    int64_t end) {
  if (!at::isFloatingType(avg_dtype)) {
    copy_chunk(avg, count, cur, begin, end);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, avg_dtype, "swa_fast_average_avg", [&] {
    using avg_t = scalar_t;
    avg_t* sq_ptr = kMoments ? sq.data_ptr<avg_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cur.scalar_type(), "swa_fast_average_cur", [&] {
      lerp_chunk<avg_t, scalar_t, kMoments>(avg, weights, count, sq_ptr, cur.const_data_ptr<scalar_t>(), begin, end);
    });
  });
}

// The update itself, after the checks: weights.size() averages of each
// current tensor, averaged[k * n + i] for cur[i] (n = cur.size()), plus
// sq_mean[i] for moments. Chunks of the first list of averages, in parallel.
template <bool kMoments>
void average_lists_cpu(
    at::TensorList averaged,
    at::TensorList sq_mean,
    const std::vector<at::Tensor>& cur,
    const std::vector<double>& weights) {
  const auto n = static_cast<int64_t>(cur.size());
  const auto count = static_cast<int64_t>(weights.size());
  std::vector<void*> avg(static_cast<size_t>(n * count));  // avg[i * count + k]: average k of cur[i]
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < count; ++k) {
      avg[i * count + k] = averaged[k * n + i].mutable_data_ptr();
    }
  }
  const std::vector<Chunk> chunks = split_into_chunks(averaged.slice(0, n));
  const int64_t grain = cpu::parallel_grain(chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const at::Tensor& sq = kMoments ? sq_mean[chunk.tensor] : averaged[chunk.tensor];
      run_chunk<kMoments>(
          averaged[chunk.tensor].scalar_type(), &avg[chunk.tensor * count], weights.data(), count, sq,
          cur[chunk.tensor], chunk.begin, chunk.end);
    }
  });
}

template <bool kMoments>
void average_cpu_impl(
    const char* op,
    at::TensorList averaged,
    at::TensorList sq_mean,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  const std::vector<at::Tensor> cur = check_average_args(op, averaged, sq_mean, kMoments, current, weight, skip);
  if (averaged.empty() || (skip.has_value() && skip->item<bool>())) {
    return;
  }
  average_lists_cpu<kMoments>(averaged, sq_mean, cur, read_weights(weight));
}

void average_cpu(
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  average_cpu_impl<false>("swa_fast.average_", averaged, {}, current, weight, skip);
}

void average_moments_cpu(
    at::TensorList mean,
    at::TensorList sq_mean,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  average_cpu_impl<true>("swa_fast.average_moments_", mean, sq_mean, current, weight, skip);
}

void multi_average_cpu(
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& skip) {
  const std::vector<at::Tensor> cur =
      check_multi_average_args("swa_fast.multi_average_", averaged, current, weights, skip);
  if (cur.empty() || (skip.has_value() && skip->item<bool>())) {
    return;
  }
  average_lists_cpu<false>(averaged, {}, cur, read_weights(weights));
}

// ---------------------------------------------------------------------------
// swag_moments_: the mean (average_'s lerp), the centred variance and the
// deviation from one read of current (CUDA: SwagFunctor)
// ---------------------------------------------------------------------------

// One SWAG step on n elements in the arithmetic type T, in place (see
// swag_moments_'s schema comment, csrc/average_args.cpp): with d = x - m,
//     m'  = lerp(m, x, w)            lerp_in_place's formula, the same fmadd on the same d,
//                                    or an exact copy of x when `copy` (w == 1), as lerp_block
//     v'  = (1 - w) * fma(w * d, d, v)
//     dev = x - m'                   (written only with kDeviation)
// This is the weighted Welford recurrence: for w = 1/(n+1) exactly the
// population variance of n+1 values, var_{n+1} = (1-w)(var_n + w d^2), and for
// any w in [0, 1] the exponentially weighted variance (West 1979). Each
// operation rounds once in T; tails run the same vector code on partial vectors.
template <typename T, bool kDeviation>
void swag_in_place(T* m, T* v, T* dev, const T* x, int64_t n, T w, bool copy) {
  using Vec = at::vec::Vectorized<T>;
  const bool small = std::abs(w) < T(0.5);
  const Vec coeff(small ? w : w - T(1));
  const Vec weight(w);
  const Vec keep(T(1) - w);
  const auto step = [&](int64_t i, int count) {
    const Vec vm = count == Vec::size() ? Vec::loadu(m + i) : Vec::loadu(m + i, count);
    const Vec vv = count == Vec::size() ? Vec::loadu(v + i) : Vec::loadu(v + i, count);
    const Vec vx = count == Vec::size() ? Vec::loadu(x + i) : Vec::loadu(x + i, count);
    const Vec d = vx - vm;
    const Vec mean = copy ? vx : at::vec::fmadd(coeff, d, small ? vm : vx);
    const Vec t = weight * d;
    const Vec variance = keep * at::vec::fmadd(t, d, vv);
    mean.store(m + i, count);
    variance.store(v + i, count);
    if constexpr (kDeviation) {
      (vx - mean).store(dev + i, count);
    }
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    step(i, Vec::size());
  }
  if (i < n) {  // the tail runs the same vector formula on a partial vector
    step(i, static_cast<int>(n - i));
  }
}

// One chunk [begin, end) of one (mean, variance, deviation, current) set:
// 512-element blocks, each of current converted to the arithmetic type once
// (as lerp_chunk), the three outputs rounded once to the averages' dtype.
// `dev` is nullptr without kDeviation.
template <typename avg_t, typename cur_t, bool kDeviation>
void swag_chunk(avg_t* mean, avg_t* var, avg_t* dev, const cur_t* cur, double weight, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<avg_t>;
  opmath_t mean_buffer[kBlock];
  opmath_t var_buffer[kBlock];
  opmath_t dev_buffer[kBlock];
  opmath_t cur_buffer[kBlock];
  // The weight as lerp_block takes it: w == 1 tested on the double, then converted.
  const bool copy = weight == 1.0;
  const auto w = static_cast<opmath_t>(weight);
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const opmath_t* x = load_as(cur + start, cur_buffer, n);
    opmath_t* m = load_as(mean + start, mean_buffer, n);
    opmath_t* v = load_as(var + start, var_buffer, n);
    opmath_t* d = nullptr;
    if constexpr (kDeviation) {
      d = output_block(dev + start, dev_buffer);
    }
    swag_in_place<opmath_t, kDeviation>(m, v, d, x, n, w, copy);
    store_from(m, mean + start, n);
    store_from(v, var + start, n);
    if constexpr (kDeviation) {
      store_from(d, dev + start, n);
    }
  }
}

// The update itself, after the checks: chunks of the mean list, in parallel.
// Every element is computed alone, so the result does not depend on the
// number of threads.
template <bool kDeviation>
void swag_lists_cpu(
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    const std::vector<at::Tensor>& cur,
    double weight) {
  const std::vector<Chunk> chunks = split_into_chunks(mean);
  const int64_t grain = cpu::parallel_grain(chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const at::Tensor& m = mean[chunk.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "swa_fast_swag_avg", [&] {
        using avg_t = scalar_t;
        avg_t* dev = kDeviation ? deviation[chunk.tensor].mutable_data_ptr<avg_t>() : nullptr;
        const at::Tensor& x = cur[chunk.tensor];
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swa_fast_swag_cur", [&] {
          swag_chunk<avg_t, scalar_t, kDeviation>(
              m.mutable_data_ptr<avg_t>(), variance[chunk.tensor].mutable_data_ptr<avg_t>(), dev,
              x.const_data_ptr<scalar_t>(), weight, chunk.begin, chunk.end);
        });
      });
    }
  });
}

void swag_moments_cpu(
    at::TensorList mean,
    at::TensorList variance,
    at::TensorList deviation,
    at::TensorList current,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& skip) {
  const std::vector<at::Tensor> cur =
      check_swag_args("swa_fast.swag_moments_", mean, variance, deviation, current, weight, skip);
  if (mean.empty() || (skip.has_value() && skip->item<bool>())) {
    return;
  }
  const double w = read_weights(weight)[0];
  if (deviation.empty()) {
    swag_lists_cpu<false>(mean, variance, deviation, cur, w);
  } else {
    swag_lists_cpu<true>(mean, variance, deviation, cur, w);
  }
}

// x * 0 is NaN exactly when x is NaN or +-Inf, so one multiply-add per
// element, vectorized, answers "any non-finite?" for a block.
template <typename T>
bool block_has_nonfinite(const T* values, int64_t n) {
  using opmath_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<opmath_t>;
  opmath_t buffer[kBlock];
  Vec acc(opmath_t(0));
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const opmath_t* x = load_as(values + start, buffer, m);
    int64_t i = 0;
    for (; i + Vec::size() <= m; i += Vec::size()) {
      acc = at::vec::fmadd(Vec::loadu(x + i), Vec(opmath_t(0)), acc);
    }
    if (i < m) {
      acc = at::vec::fmadd(Vec::loadu(x + i, static_cast<int>(m - i)), Vec(opmath_t(0)), acc);
    }
  }
  const opmath_t total = at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, acc);
  return std::isnan(total);
}

at::Tensor nonfinite_flag_cpu(at::TensorList tensors) {
  check_nonfinite_args(tensors);
  const std::vector<at::Tensor> floating = nonfinite_inputs(tensors);
  const std::vector<Chunk> chunks = split_into_chunks(floating);
  std::vector<char> found(chunks.size(), 0);
  const int64_t grain = cpu::parallel_grain(chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const at::Tensor& t = floating[chunks[c].tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "swa_fast_nonfinite", [&] {
        found[c] = block_has_nonfinite(t.const_data_ptr<scalar_t>() + chunks[c].begin, chunks[c].end - chunks[c].begin);
      });
    }
  });
  const bool any = std::any_of(found.begin(), found.end(), [](char f) { return f != 0; });
  at::Tensor flag = at::empty({}, at::TensorOptions().dtype(at::kBool).device(at::kCPU));
  flag.fill_(any);
  return flag;
}

}  // namespace

// ---------------------------------------------------------------------------
// average_stochastic_: average_'s lerp, then float16/bfloat16 averages rounded
// stochastically (CUDA: StochasticLerpFunctor)
// ---------------------------------------------------------------------------

// One chunk [begin, end) of a float16/bfloat16 average: the lerp in float32
// exactly as lerp_block computes it (weight == 1: x itself), then each value
// rounded with its element's word, a block at a time (cpu/stochastic_block.h).
template <typename avg_t, typename cur_t>
void stochastic_chunk(
    avg_t* avg,
    const cur_t* cur,
    double weight,
    const stochastic::Key& key,
    int64_t stream,
    int64_t begin,
    int64_t end) {
  static_assert(kBlock <= stochastic::cpu::kMaxBlock, "a block's words are generated in one go");
  float avg_buffer[kBlock];
  float cur_buffer[kBlock];
  float uniforms[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const float* x = load_as(cur + start, cur_buffer, n);
    const float* r = x;
    if (weight != 1.0) {
      widen_to_float(avg + start, avg_buffer, n);
      lerp_in_place(avg_buffer, x, n, static_cast<float>(weight));
      r = avg_buffer;
    }
    stochastic::cpu::block_uniforms(key, stream, start, n, uniforms);
    stochastic::cpu::round_block(r, uniforms, avg + start, n);
  }
}

// The stream of each pair: its position among the pairs of its (averaged
// dtype, current dtype), as the CUDA kernel's launch groups number them.
std::vector<int64_t> stochastic_streams(at::TensorList averaged, const std::vector<at::Tensor>& cur) {
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys;
  std::vector<int64_t> counts;
  std::vector<int64_t> streams;
  streams.reserve(cur.size());
  for (size_t i = 0; i < cur.size(); ++i) {
    const auto key = std::make_pair(averaged[i].scalar_type(), cur[i].scalar_type());
    size_t k = 0;
    while (k < keys.size() && keys[k] != key) {
      ++k;
    }
    if (k == keys.size()) {
      keys.push_back(key);
      counts.push_back(0);
    }
    streams.push_back(counts[k]++);
  }
  return streams;
}

void average_stochastic_cpu(
    at::TensorList averaged,
    at::TensorList current,
    const at::Tensor& weight,
    const at::Tensor& counter,
    int64_t seed,
    const std::optional<at::Tensor>& skip) {
  const char* op = "swa_fast.average_stochastic_";
  const std::vector<at::Tensor> cur = check_stochastic_args(op, averaged, current, weight, counter, skip);
  if (averaged.empty() || (skip.has_value() && skip->item<bool>())) {
    return;
  }
  const double w = read_weights(weight)[0];
  const stochastic::Key key{static_cast<uint64_t>(seed), static_cast<uint64_t>(counter.item<int64_t>())};
  const std::vector<int64_t> streams = stochastic_streams(averaged, cur);
  std::vector<void*> avg(averaged.size());
  for (size_t i = 0; i < averaged.size(); ++i) {
    avg[i] = averaged[i].mutable_data_ptr();
  }
  const std::vector<Chunk> chunks = split_into_chunks(averaged);
  const int64_t grain = cpu::parallel_grain(chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const at::ScalarType avg_dtype = averaged[chunk.tensor].scalar_type();
      if (!is_reduced_float(avg_dtype)) {  // float32/float64 or a copy: exactly average_
        run_chunk<false>(avg_dtype, &avg[chunk.tensor], &w, 1, averaged[chunk.tensor], cur[chunk.tensor],
                         chunk.begin, chunk.end);
        continue;
      }
      AT_DISPATCH_REDUCED_FLOATING_TYPES(avg_dtype, "swa_fast_average_stochastic_avg", [&] {
        using avg_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cur[chunk.tensor].scalar_type(),
                                        "swa_fast_average_stochastic_cur", [&] {
          if constexpr (!std::is_same_v<scalar_t, double>) {  // is_stochastic_dtype_pair refused float64
            stochastic_chunk<avg_t, scalar_t>(static_cast<avg_t*>(avg[chunk.tensor]),
                                              cur[chunk.tensor].const_data_ptr<scalar_t>(), w, key,
                                              streams[chunk.tensor], chunk.begin, chunk.end);
          }
        });
      });
    }
  });
}

TORCH_LIBRARY_IMPL(swa_fast, CPU, m) {
  m.impl("average_", &average_cpu);
  m.impl("average_moments_", &average_moments_cpu);
  m.impl("multi_average_", &multi_average_cpu);
  m.impl("swag_moments_", &swag_moments_cpu);
  m.impl("average_stochastic_", &average_stochastic_cpu);
  m.impl("nonfinite_flag", &nonfinite_flag_cpu);
}

}  // namespace swa_fast
