// CPU kernels of average_ and average_moments_.
//
// Structure (mirrored by csrc/cuda/average_cuda.cu):
//   1. check_average_args validates everything on the host;
//   2. the whole list is cut into fixed-size chunks (cpu::kChunk elements, cpu/chunks.h), each
//      chunk one unit of at::parallel_for work, so one huge tensor and many
//      tiny ones load the threads evenly;
//   3. each chunk runs lerp_chunk<avg_t, cur_t, kMoments>, which converts to
//      the arithmetic type (fp32, fp64 for fp64) in small stack blocks and
//      applies torch's lerp formula with at::vec::Vectorized.

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
#include "cpu/vec_load.h"

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

// One chunk [begin, end) of one tensor pair (plus its squares for moments).
// weight == 1 is an exact copy, as torch's first AveragedModel update is, even
// when current holds Inf.
template <typename avg_t, typename cur_t, bool kMoments>
void lerp_chunk(avg_t* avg, avg_t* sq, const cur_t* cur, int64_t begin, int64_t end, double weight) {
  using opmath_t = at::opmath_type<avg_t>;
  const opmath_t w = static_cast<opmath_t>(weight);
  const bool copy = weight == 1.0;
  opmath_t avg_buffer[kBlock];
  opmath_t sq_buffer[kBlock];
  opmath_t cur_buffer[kBlock];
  opmath_t square_buffer[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const opmath_t* x = load_as(cur + start, cur_buffer, n);
    if (copy) {
      at::vec::convert(x, avg + start, n);
    } else {
      opmath_t* a = load_as(avg + start, avg_buffer, n);
      lerp_in_place(a, x, n, w);
      store_from(a, avg + start, n);
    }
    if constexpr (kMoments) {
      std::memcpy(square_buffer, x, n * sizeof(opmath_t));
      square_in_place(square_buffer, n);
      if (copy) {
        at::vec::convert(square_buffer, sq + start, n);
      } else {
        opmath_t* s = load_as(sq + start, sq_buffer, n);
        lerp_in_place(s, square_buffer, n, w);
        store_from(s, sq + start, n);
      }
    }
  }
}

// Integer and bool tensors (e.g. BatchNorm's num_batches_tracked) are copied.
void copy_chunk(const at::Tensor& dst, const at::Tensor& src, int64_t begin, int64_t end) {
  const int64_t item = dst.element_size();
  std::memcpy(
      static_cast<char*>(dst.data_ptr()) + begin * item, static_cast<const char*>(src.const_data_ptr()) + begin * item,
      (end - begin) * item);
}

template <bool kMoments>
void run_chunk(const at::Tensor& avg, const at::Tensor& sq, const at::Tensor& cur, int64_t begin, int64_t end, double w) {
  if (!at::isFloatingType(avg.scalar_type())) {
    copy_chunk(avg, cur, begin, end);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, avg.scalar_type(), "swa_fast_average_avg", [&] {
    using avg_t = scalar_t;
    avg_t* sq_ptr = kMoments ? sq.data_ptr<avg_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cur.scalar_type(), "swa_fast_average_cur", [&] {
      lerp_chunk<avg_t, scalar_t, kMoments>(avg.data_ptr<avg_t>(), sq_ptr, cur.const_data_ptr<scalar_t>(), begin, end, w);
    });
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
  const double w = weight.item<double>();
  const std::vector<Chunk> chunks = split_into_chunks(averaged);
  const int64_t grain = cpu::parallel_grain(chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const at::Tensor& sq = kMoments ? sq_mean[chunk.tensor] : averaged[chunk.tensor];
      run_chunk<kMoments>(averaged[chunk.tensor], sq, cur[chunk.tensor], chunk.begin, chunk.end, w);
    }
  });
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

TORCH_LIBRARY_IMPL(swa_fast, CPU, m) {
  m.impl("average_", &average_cpu);
  m.impl("average_moments_", &average_moments_cpu);
  m.impl("nonfinite_flag", &nonfinite_flag_cpu);
}

}  // namespace swa_fast
