// CPU kernel of distance.
//
// Structure (mirrored by csrc/cuda/distance_cuda.cu):
//   1. check_distance_args validates everything on the host and lays every
//      b[i] out like a[i];
//   2. the whole list is cut into fixed-size chunks (cpu::kChunk elements, cpu/chunks.h), each
//      chunk one unit of at::parallel_for work; chunk_sum_of_squares<acc_t,
//      a_t, b_t> writes the chunk's sum of squared differences to
//      partials[chunk] (fp32, fp64 when any input is fp64), with
//      at::vec::Vectorized loads that widen fp16/bf16 in registers;
//   3. one thread sums each tensor's partials in chunk order and the
//      per-tensor sums in index order, then takes the square roots.
//
// Determinism: chunk boundaries and the order of additions inside a chunk
// depend only on the shapes, never on the thread count or on which thread
// runs a chunk, so the same inputs give the same bits on every call (tests:
// set_num_threads(1) vs 2).

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/functional_bfloat16.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/chunks.h"
#include "distance_args.h"

namespace swa_fast {
namespace {

using cpu::Chunk;
using cpu::split_into_chunks;

// Independent vector accumulators: enough dependent-add chains in flight that
// the loop waits on memory, not on the fused multiply-add latency.
constexpr int kAccumulators = 4;

// ---------------------------------------------------------------------------
// One chunk's sum of squares (CUDA: SumOfSquaresFunctor)
// ---------------------------------------------------------------------------

// One Vectorized<acc_t> from `count` values of T at p; lanes past count are
// zero (they add nothing). fp16/bf16 widen to fp32 in registers
// (at::vec::load_to_float), so no pass through a stack buffer.
template <typename acc_t, typename T>
at::vec::Vectorized<acc_t> load_vec(const T* p, int64_t count) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vec::loadu(p, count);
  } else if constexpr (std::is_same_v<acc_t, float> && at::vec::is_reduced_floating_point_v<T>) {
    Vec out;
    if (count >= Vec::size()) {
      at::vec::load_to_float(p, out);
    } else {
      T padded[Vec::size()];
      std::fill(padded, padded + Vec::size(), static_cast<T>(0.0f));
      std::copy(p, p + count, padded);
      at::vec::load_to_float(padded, out);
    }
    return out;
  } else {
    // A lower-precision input accumulated in double (a call with an fp64
    // tensor somewhere): rare, so a plain widening loop.
    __at_align__ acc_t values[Vec::size()];
    for (int64_t k = 0; k < Vec::size(); ++k) {
      values[k] = k < count ? static_cast<acc_t>(p[k]) : acc_t(0);
    }
    return Vec::loadu(values);
  }
}

// Sum over [0, n) of (a - b)^2 (of a^2 when b_t is void), in acc_t: whole
// groups of kAccumulators vectors go round-robin into the accumulators, the
// remaining whole vectors into acc[0], the last partial vector (zero-padded)
// too, so the order of additions depends on n alone.
template <typename acc_t, typename a_t, typename b_t>
acc_t chunk_sum_of_squares(const a_t* a, const void* b_raw, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  const auto diff = [&](int64_t i, int64_t count) {
    const Vec x = load_vec<acc_t>(a + i, count);
    if constexpr (std::is_void_v<b_t>) {
      return x;
    } else {
      return x - load_vec<acc_t>(static_cast<const b_t*>(b_raw) + i, count);
    }
  };
  Vec acc[kAccumulators];
  for (int k = 0; k < kAccumulators; ++k) {
    acc[k] = Vec(acc_t(0));
  }
  int64_t i = 0;
  for (; i + kAccumulators * kWidth <= n; i += kAccumulators * kWidth) {
    for (int k = 0; k < kAccumulators; ++k) {
      const Vec d = diff(i + k * kWidth, kWidth);
      acc[k] = at::vec::fmadd(d, d, acc[k]);
    }
  }
  for (; i + kWidth <= n; i += kWidth) {
    const Vec d = diff(i, kWidth);
    acc[0] = at::vec::fmadd(d, d, acc[0]);
  }
  if (i < n) {
    const Vec d = diff(i, n - i);
    acc[0] = at::vec::fmadd(d, d, acc[0]);
  }
  static_assert(kAccumulators == 4, "the combination below names four accumulators");
  const Vec sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  return at::vec::vec_reduce_all([](Vec u, Vec v) { return u + v; }, sum);
}

// ---------------------------------------------------------------------------
// Chunking and dispatch (CUDA: grouping by dtype pair, multi_tensor_apply)
// ---------------------------------------------------------------------------

template <typename acc_t>
acc_t run_chunk(const DistanceInputs& in, const Chunk& chunk) {
  const at::Tensor& a = in.a[chunk.tensor];
  const bool pair = !in.b.empty();
  const std::optional<c10::ScalarType> b_dtype =
      pair ? std::optional<c10::ScalarType>(in.b[chunk.tensor].scalar_type()) : std::nullopt;
  acc_t result = 0;
  dispatch_distance_types(in.acc_dtype, a.scalar_type(), b_dtype, [&](auto acc_tag, auto a_tag, auto b_tag) {
    using a_t = typename decltype(a_tag)::type;
    using b_t = typename decltype(b_tag)::type;
    // The dispatch instantiates both accumulation types; only acc_t runs.
    if constexpr (std::is_same_v<typename decltype(acc_tag)::type, acc_t>) {
      const void* b = nullptr;
      if constexpr (!std::is_void_v<b_t>) {
        b = in.b[chunk.tensor].template const_data_ptr<b_t>() + chunk.begin;
      }
      result = chunk_sum_of_squares<acc_t, a_t, b_t>(
          a.template const_data_ptr<a_t>() + chunk.begin, b, chunk.end - chunk.begin);
    } else {
      TORCH_INTERNAL_ASSERT(false, "swa_fast.distance: accumulation dtype mismatch");
    }
  });
  return result;
}

// ---------------------------------------------------------------------------
// distance (CUDA: distance_cuda)
// ---------------------------------------------------------------------------

template <typename acc_t>
void distance_impl(const DistanceInputs& in, at::Tensor& per_tensor, at::Tensor& total) {
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = split_into_chunks(in.a, &first_chunk);
  std::vector<acc_t> partials(chunks.size());
  const int64_t grain = cpu::parallel_grain(chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      partials[c] = run_chunk<acc_t>(in, chunks[c]);
    }
  });
  // One thread, fixed order: chunk order within a tensor, index order over tensors.
  acc_t* norms = per_tensor.mutable_data_ptr<acc_t>();
  acc_t sum_all = 0;
  for (size_t i = 0; i < in.a.size(); ++i) {
    acc_t sum = 0;
    for (int64_t c = first_chunk[i]; c < first_chunk[i + 1]; ++c) {
      sum += partials[c];
    }
    sum_all += sum;
    norms[i] = std::sqrt(sum);
  }
  *total.mutable_data_ptr<acc_t>() = std::sqrt(sum_all);
}

std::tuple<at::Tensor, at::Tensor> distance_cpu(at::TensorList a, const std::optional<at::TensorList>& b) {
  const DistanceInputs in = check_distance_args(a, b);
  auto [per_tensor, total] = empty_distance_outputs(in);
  if (in.acc_dtype == c10::ScalarType::Double) {
    distance_impl<double>(in, per_tensor, total);
  } else {
    distance_impl<float>(in, per_tensor, total);
  }
  return {per_tensor, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CPU, m) {
  m.impl("distance", &distance_cpu);
}

}  // namespace swa_fast
