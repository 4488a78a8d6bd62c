// CUDA kernels of ghost batch normalization.
//
// Structure (mirrors csrc/cpu/ghost_bn_cpu.cpp section by section):
//   1. entry points validate (ghost_bn_args.h) and lay the input out densely
//      as [N, C, S] (ChannelsFirst) or [N, S, C] (ChannelsLast);
//   2. ghost_statistics: per (ghost, channel) mean and biased variance in one
//      read of the input: every thread keeps Welford moments, merged with
//      Chan's formula within the block (no sum-of-squares cancellation);
//   3. ghost_normalize: y = x * scale[g, c] + shift[g, c], one elementwise
//      pass; scale/shift are computed where the statistics are finished;
//   4. ghost_backward_sums: per (ghost, channel) sums of dy and
//      dy * (x - mean) in one reduction, which also finishes the dx
//      coefficients a, k, d;
//   5. ghost_grad_input: dx = a * dy - k * x + d, one elementwise pass, and
//      ghost_grad_affine: grad weight/bias summed over ghosts in order;
//   6. ghost_update_running_stats: one thread per channel, ghosts in order,
//      num_batches_tracked read on the device.
//
// Reductions (steps 2 and 4). Every (ghost, channel) sum is cut into
// `splits` contiguous pieces; one block reduces one piece of one pair
// (ChannelsFirst) or of a tile of channels (ChannelsLast). With one split
// the block finishes the pair itself; with more, each block writes a partial
// to a workspace and a small kernel (one warp per pair) merges the partials
// in index order. The split count depends on the shape only (never on the
// GPU), threads and warps merge in a fixed tree, and there are no atomics:
// the same inputs give the same bits on every run.
//
// Elementwise passes (steps 3 and 5) walk the tensor in grid-stride order,
// each thread carrying its element's (ghost, channel) as mixed-radix digits
// that it advances by additions, so no element pays for an integer division.
// Both reductions and elementwise passes use 16-byte vector accesses whenever
// the contiguous run they read (a row of S values for ChannelsFirst, of C
// channels for ChannelsLast) is a multiple of the vector width, scalar ones
// otherwise: a choice by shape alone. The entry points copy an input that
// starts off a 16-byte boundary (a rare storage offset) to fresh memory
// first, so the grouping of values, the thread counts and the splits, and
// with them the order of every addition, never depend on where a tensor
// starts: a misaligned view gives the bits of an aligned copy. All offsets
// are int64.
//
// Nothing is read back to the host (num_batches_tracked included), so a
// training step that calls these ops can be captured in a CUDA graph.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"  // mta::AlignedVector, mta::kVectorBytes, mta::kVectorWidth
#include "cuda/rounding.cuh"  // fma_rn, mul_rn, sqrt_rn
#include "ghost_bn_args.h"

namespace swa_fast {
namespace {

// Reductions: at most 512 threads a block; with fewer (ghost, channel) pairs
// than kTargetReduceBlocks, each pair's sum is split until there are about
// that many blocks (about 8 per SM on a 132-SM H100, i.e. four waves of the
// two resident blocks: a short last wave), but never into pieces under
// kMinSplitElements elements (64 KB of fp32), where a block would spend more
// time starting than reading. The split count depends on the shape (and the
// vector width) only, never on the GPU, so results are the same everywhere.
constexpr int kReduceThreads = 512;
constexpr int64_t kTargetReduceBlocks = 1024;
constexpr int64_t kMinSplitElements = 16384;
constexpr int64_t kMaxSplits = 1024;
// Values a thread loads before it folds them into its accumulator: four
// independent loads in flight per thread, and one Welford division per
// kUnroll loads (ChannelsLast) or kUnroll vectors (ChannelsFirst).
constexpr int kUnroll = 4;
// ChannelsLast threads keep kVec accumulators of value_t; they load two rows
// at a time instead of four when those would not fit the 64 registers below:
// 8-wide (fp16/bf16) vectors, and fp64 (twice as wide accumulators).
template <int kVec, typename T>
constexpr int kRowUnroll = (kVec >= 8 || (kVec > 1 && sizeof(T) == 8)) ? 2 : kUnroll;
// Two 512-thread blocks per SM at least: caps the reduction kernels at 64
// registers a thread (half the SM's threads resident).
constexpr int kReduceMinBlocks = 2;
// Merge of split partials: one warp per (ghost, channel).
constexpr int kMergeThreads = 256;
// Elementwise passes and the per-channel kernels.
constexpr int kApplyThreads = 256;
constexpr int kChannelThreads = 256;
// Grid-stride loops cover any task count; grids stay well below the 2^31 - 1
// limit of gridDim.x (only gridDim.x is ever used).
constexpr int64_t kMaxGrid = int64_t{1} << 20;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kReduceThreads % 32 == 0 && kMergeThreads % 32 == 0, "blocks of whole warps");

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int64_t next_power_of_two(int64_t v) {
  int64_t p = 1;
  while (p < v) {
    p *= 2;
  }
  return p;
}

bool is_aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % mta::kVectorBytes == 0;
}

// `t` itself when its data starts on a 16-byte boundary, else a copy in fresh
// (aligned) memory with the same layout. Dense views at odd storage offsets
// are rare; copying them keeps every kernel on its one, vectorized order.
at::Tensor aligned_16(const at::Tensor& t) {
  return is_aligned_16(t.const_data_ptr()) ? t : t.clone(at::MemoryFormat::Preserve);
}

// Streaming multiprocessors of a device, queried once (a driver attribute
// read, not a stream operation: allowed during graph capture).
int multiprocessor_count(c10::DeviceIndex device) {
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
int blocks_per_sm(const void* kernel, int threads, c10::DeviceIndex device) {
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

// The geometry the kernels see: GhostGeometry with the ghost size clamped to
// N. A ghost_batch_size above N makes one ghost of N samples either way, and
// the clamp keeps products such as ghost * C * S within the element count.
struct Shape {
  int64_t batch;       // N
  int64_t channels;    // C
  int64_t spatial;     // S
  int64_t ghost;       // min(ghost_batch_size, N)
  int64_t num_ghosts;  // G

  __host__ __device__ int64_t ghost_samples(int64_t g) const {
    const int64_t left = batch - g * ghost;
    return left < ghost ? left : ghost;
  }
};

Shape make_shape(const GhostGeometry& geo) {
  return Shape{geo.batch, geo.channels, geo.spatial, std::min(geo.ghost_size, geo.batch), geo.num_ghosts};
}

// ---------------------------------------------------------------------------
// Loads, stores and parameters of any floating dtype
// ---------------------------------------------------------------------------

// One access unit of kVec consecutive elements at p + offset, converted to
// the arithmetic type. kVec > 1 needs p + offset aligned to the vector.
template <int kVec, typename scalar_t, typename T>
__device__ __forceinline__ void load_unit(const scalar_t* p, int64_t offset, T* out) {
  if constexpr (kVec == 1) {
    out[0] = static_cast<T>(p[offset]);
  } else {
    const auto v = *reinterpret_cast<const mta::AlignedVector<scalar_t, kVec>*>(p + offset);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out[k] = static_cast<T>(v.val[k]);
    }
  }
}

template <int kVec, typename scalar_t, typename T>
__device__ __forceinline__ void store_unit(scalar_t* p, int64_t offset, const T* values) {
  if constexpr (kVec == 1) {
    p[offset] = static_cast<scalar_t>(values[0]);
  } else {
    mta::AlignedVector<scalar_t, kVec> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v.val[k] = static_cast<scalar_t>(values[k]);
    }
    *reinterpret_cast<mta::AlignedVector<scalar_t, kVec>*>(p + offset) = v;
  }
}

// Per-channel tensors (weight, bias, running stats, grad weight/bias) may
// have another floating dtype than the input, and weight and bias may even
// differ from each other (fp32 weight, bf16 bias for bf16 input). They are
// tiny and touched once per (ghost, channel) at most, so their dtype is a
// runtime tag instead of more template instantiations.
enum class Element : int { Float, Double, Half, BFloat16 };

Element element_of(at::ScalarType dtype) {
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
ParamRef param_ref(const std::optional<at::Tensor>& param, at::Tensor& contiguous) {
  if (!param.has_value() || !param->defined()) {
    return ParamRef{nullptr, Element::Float};
  }
  contiguous = param->contiguous();
  return ParamRef{contiguous.const_data_ptr(), element_of(contiguous.scalar_type())};
}


// 1 / sqrt(var + eps) as the CPU computes it.
template <typename T>
__device__ __forceinline__ T inverse_std(T var, T eps) {
  return T(1) / sqrt_rn(var + eps);
}

// ---------------------------------------------------------------------------
// Per-(ghost, channel) reductions (CPU: the task loops of ghost_statistics
// and ghost_backward_sums)
// ---------------------------------------------------------------------------
//
// The kernels below know nothing about what is summed. An Op is a struct
// with
//   value_t (the arithmetic type), Acc (a plain struct), Params (pointers and
//   scalars, passed by value), kReadsGrad (whether dy is read),
//   identity(), context(params, pair) (a per-pair value, e.g. the mean),
//   add<K>(acc, x[K], dy[K], context) (K values of one pair),
//   add_rows<R, V>(acc[V], x[R][V], dy[R][V], context[V]) (R rows of V
//   consecutive channels; every channel of a thread has seen the same rows),
//   merge(a, b), shfl_down(acc, offset),
//   finalize(params, pair, acc) (with one split), store_partial and
//   load_partial(params, index) (with more).
// Pairs are numbered g * C + c; partial index = pair * splits + split.

struct ReduceGeometry {
  Shape shape;
  int64_t splits;  // pieces per (ghost, channel) sum
  int64_t tiles;   // ChannelsLast: channel tiles per ghost (1 for ChannelsFirst)
  int64_t tasks;   // blocks' worth of work: pairs (or ghosts x tiles) x splits
};

// The [begin, end) part `split` of `total` units, same-sized pieces.
__device__ __forceinline__ void split_range(int64_t total, int64_t splits, int64_t split, int64_t& begin,
                                            int64_t& end) {
  const int64_t per_split = (total + splits - 1) / splits;
  begin = split * per_split < total ? split * per_split : total;
  end = total - begin < per_split ? total : begin + per_split;
}

template <typename Op>
__device__ __forceinline__ typename Op::Acc warp_reduce(typename Op::Acc acc) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    acc = Op::merge(acc, Op::shfl_down(acc, offset));
  }
  return acc;
}

// The block's merged accumulator, valid in thread 0. blockDim.x is a
// multiple of 32 (1-D blocks). Ends with a barrier so `warp_results` can be
// reused by the block's next task.
template <typename Op>
__device__ __forceinline__ typename Op::Acc block_reduce(typename Op::Acc acc, typename Op::Acc* warp_results) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warps = static_cast<int>(blockDim.x) / 32;
  acc = warp_reduce<Op>(acc);
  if (lane == 0) {
    warp_results[warp] = acc;
  }
  __syncthreads();
  if (warp == 0) {
    acc = lane < warps ? warp_results[lane] : Op::identity();
    acc = warp_reduce<Op>(acc);
  }
  __syncthreads();
  return acc;
}

// [N, C, S]: one task = one split of one (ghost, channel) pair. The pair's
// values are samples_g rows of S contiguous values, C * S apart; the split
// is a contiguous range of the flattened (row, unit) index, so short rows
// (S = 2) and long ones (S = 4096) both keep every thread busy. Each thread
// steps by blockDim.x units and carries its (row, unit) position by
// additions: one division per task, none per element.
template <typename Op, typename scalar_t, int kVec>
__global__ void __launch_bounds__(kReduceThreads, kReduceMinBlocks) reduce_channels_first_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    typename Op::Params params,
    ReduceGeometry geo) {
  using T = typename Op::value_t;
  using Acc = typename Op::Acc;
  __shared__ Acc warp_results[kReduceThreads / 32];

  const int64_t C = geo.shape.channels;
  const int64_t S = geo.shape.spatial;
  const int64_t P = geo.splits;
  const int64_t units_per_row = S / kVec;  // S % kVec == 0 (host check)
  const int64_t row_stride = C * S;        // one sample to the next, same channel
  const int64_t step = blockDim.x;
  const int64_t step_rows = step / units_per_row;
  const int64_t step_units = step % units_per_row;
  const int64_t step_offset = step_rows * row_stride + step_units * kVec;
  const int64_t wrap_offset = row_stride - units_per_row * kVec;  // end of a row -> start of the next

  for (int64_t task = blockIdx.x; task < geo.tasks; task += gridDim.x) {
    const int64_t pair = task / P;
    const int64_t split = task - pair * P;
    const int64_t g = pair / C;
    const int64_t c = pair - g * C;
    const int64_t first_sample = g * geo.shape.ghost;
    const int64_t units = geo.shape.ghost_samples(g) * units_per_row;
    int64_t begin, end;
    split_range(units, P, split, begin, end);

    const T context = Op::context(params, pair);
    Acc acc = Op::identity();
    int64_t u = begin + threadIdx.x;
    if (u < end) {
      const int64_t row = u / units_per_row;
      int64_t unit = u - row * units_per_row;
      int64_t offset = ((first_sample + row) * C + c) * S + unit * kVec;
      const auto advance = [&]() {
        offset += step_offset;
        unit += step_units;
        if (unit >= units_per_row) {  // unit + step_units < 2 * units_per_row: one wrap at most
          unit -= units_per_row;
          offset += wrap_offset;
        }
      };
      for (; u + (kUnroll - 1) * step < end; u += kUnroll * step) {
        T xs[kUnroll * kVec];
        T ds[kUnroll * kVec];
#pragma unroll
        for (int r = 0; r < kUnroll; ++r) {
          load_unit<kVec>(x, offset, xs + r * kVec);
          if constexpr (Op::kReadsGrad) {
            load_unit<kVec>(dy, offset, ds + r * kVec);
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              ds[r * kVec + k] = T(0);
            }
          }
          advance();
        }
        Op::template add<kUnroll * kVec>(acc, xs, ds, context);
      }
      for (; u < end; u += step) {
        T xs[kVec];
        T ds[kVec];
        load_unit<kVec>(x, offset, xs);
        if constexpr (Op::kReadsGrad) {
          load_unit<kVec>(dy, offset, ds);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            ds[k] = T(0);
          }
        }
        Op::template add<kVec>(acc, xs, ds, context);
        advance();
      }
    }
    acc = block_reduce<Op>(acc, warp_results);
    if (threadIdx.x == 0) {
      if (P == 1) {
        Op::finalize(params, pair, acc);
      } else {
        Op::store_partial(params, task, acc);
      }
    }
  }
}

// [N, S, C]: one task = one split of the rows of one ghost, for one tile of
// blockDim.x * kVec channels. threadIdx.x runs along the channels (a warp
// reads whole rows, coalesced), threadIdx.y along the rows; each thread
// keeps kVec accumulators, and the rows' accumulators are merged in shared
// memory by halving (a fixed tree). blockDim.y is a power of two.
template <typename Op, typename scalar_t, int kVec>
__global__ void __launch_bounds__(kReduceThreads, kReduceMinBlocks) reduce_channels_last_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    typename Op::Params params,
    ReduceGeometry geo) {
  using T = typename Op::value_t;
  using Acc = typename Op::Acc;
  // Threads in the upper half of the rows still merging park their
  // accumulators here: at most blockDim.y / 2 * blockDim.x <= 256 threads.
  __shared__ Acc exchange[kReduceThreads / 2 * kVec];

  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int bx = static_cast<int>(blockDim.x);
  const int by = static_cast<int>(blockDim.y);
  const int64_t C = geo.shape.channels;
  const int64_t S = geo.shape.spatial;
  const int64_t P = geo.splits;
  const int64_t row_step = static_cast<int64_t>(by) * C;
  constexpr int kRows = kRowUnroll<kVec, T>;

  for (int64_t task = blockIdx.x; task < geo.tasks; task += gridDim.x) {
    const int64_t split = task % P;
    const int64_t rest = task / P;
    const int64_t tile = rest % geo.tiles;
    const int64_t g = rest / geo.tiles;
    const int64_t c0 = (tile * bx + tx) * kVec;  // this thread's first channel
    // C % kVec == 0 when kVec > 1 (host check): a unit is in range or not.
    const bool active = c0 < C;
    const int64_t first_row = g * geo.shape.ghost * S;
    const int64_t rows = geo.shape.ghost_samples(g) * S;
    int64_t begin, end;
    split_range(rows, P, split, begin, end);

    T context[kVec];
    Acc acc[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc[k] = Op::identity();
      context[k] = active ? Op::context(params, g * C + c0 + k) : T(0);
    }
    if (active) {
      int64_t r = begin + ty;
      int64_t offset = (first_row + r) * C + c0;
      for (; r + (kRows - 1) * by < end; r += kRows * by) {
        T xs[kRows][kVec];
        T ds[kRows][kVec];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          load_unit<kVec>(x, offset, xs[u]);
          if constexpr (Op::kReadsGrad) {
            load_unit<kVec>(dy, offset, ds[u]);
          }
          offset += row_step;
        }
        Op::template add_rows<kRows, kVec>(acc, xs, ds, context);
      }
      for (; r < end; r += by) {
        T xs[1][kVec];
        T ds[1][kVec];
        load_unit<kVec>(x, offset, xs[0]);
        if constexpr (Op::kReadsGrad) {
          load_unit<kVec>(dy, offset, ds[0]);
        }
        Op::template add_rows<1, kVec>(acc, xs, ds, context);
        offset += row_step;
      }
    }
    for (int half = by / 2; half > 0; half /= 2) {
      if (ty >= half && ty < 2 * half) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          exchange[((ty - half) * bx + tx) * kVec + k] = acc[k];
        }
      }
      __syncthreads();
      if (ty < half) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          acc[k] = Op::merge(acc[k], exchange[(ty * bx + tx) * kVec + k]);
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int64_t pair = g * C + c0 + k;
        if (P == 1) {
          Op::finalize(params, pair, acc[k]);
        } else {
          Op::store_partial(params, pair * P + split, acc[k]);
        }
      }
    }
  }
}

// One warp per pair: lane l merges partials l, l + 32, ... in order, then
// the lanes merge in a fixed tree; lane 0 finishes the pair.
template <typename Op>
__global__ void __launch_bounds__(kMergeThreads) merge_partials_kernel(
    typename Op::Params params,
    int64_t pairs,
    int64_t splits) {
  using Acc = typename Op::Acc;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t pair = first; pair < pairs; pair += stride) {  // the same trip count for a whole warp
    Acc acc = Op::identity();
    for (int64_t j = lane; j < splits; j += 32) {
      acc = Op::merge(acc, Op::load_partial(params, pair * splits + j));
    }
    acc = warp_reduce<Op>(acc);
    if (lane == 0) {
      Op::finalize(params, pair, acc);
    }
  }
}

// Host side: how a reduction is cut into blocks, and its launches.
struct ReducePlan {
  ReduceGeometry geo;
  dim3 block;
  int64_t grid;
};

// A split count that brings pairs x splits up to about kTargetReduceBlocks,
// with no piece under kMinSplitElements; `groups` is the number of tasks of
// one split, `elements` the values of one task's largest (first) ghost.
int64_t choose_splits(int64_t groups, int64_t elements) {
  if (groups >= kTargetReduceBlocks) {
    return 1;
  }
  int64_t splits = ceil_div(kTargetReduceBlocks, groups);
  splits = std::min(splits, std::max<int64_t>(1, elements / kMinSplitElements));
  return std::min(splits, kMaxSplits);
}

ReducePlan plan_channels_first(const Shape& shape, int vec) {
  ReducePlan plan;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  const int64_t splits = choose_splits(pairs, shape.ghost * shape.spatial);
  // Threads: 512, halved while a thread would get fewer than kUnroll units.
  const int64_t units_per_split = ceil_div(shape.ghost * (shape.spatial / vec), splits);
  int threads = kReduceThreads;
  while (threads > 32 && static_cast<int64_t>(threads) * kUnroll > units_per_split) {
    threads /= 2;
  }
  plan.geo = ReduceGeometry{shape, splits, 1, pairs * splits};
  plan.block = dim3(static_cast<unsigned>(threads));
  plan.grid = std::min(plan.geo.tasks, kMaxGrid);
  return plan;
}

ReducePlan plan_channels_last(const Shape& shape, int vec) {
  ReducePlan plan;
  const int64_t channel_units = shape.channels / vec;
  // Up to a warp along the channels (32 x 16 bytes: four rows of 128 bytes
  // per warp load); fewer when there are fewer channels.
  const int tx = static_cast<int>(std::min<int64_t>(32, next_power_of_two(channel_units)));
  const int64_t tiles = ceil_div(channel_units, tx);
  const int64_t tile_channels = std::min<int64_t>(shape.channels, static_cast<int64_t>(tx) * vec);
  const int64_t rows_per_ghost = shape.ghost * shape.spatial;
  const int64_t splits = choose_splits(shape.num_ghosts * tiles, rows_per_ghost * tile_channels);
  // Rows: as many threads as fit, halved while they would outnumber the rows.
  const int64_t rows_per_split = ceil_div(rows_per_ghost, splits);
  int ty = kReduceThreads / tx;
  while (ty > 1 && ty / 2 >= rows_per_split) {
    ty /= 2;
  }
  plan.geo = ReduceGeometry{shape, splits, tiles, shape.num_ghosts * tiles * splits};
  plan.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  plan.grid = std::min(plan.geo.tasks, kMaxGrid);
  return plan;
}

// Runs Op's reduction over x (and dy) laid out per `layout`; Op::finalize
// runs once per (ghost, channel) with the whole sum. With more than one
// split, `alloc_partials(count)` must set params' partial pointers for
// `count` partials first.
template <typename Op, typename scalar_t, typename AllocPartials>
void run_reduction(
    const scalar_t* x,
    const scalar_t* dy,
    typename Op::Params params,
    const Shape& shape,
    GhostLayout layout,
    const AllocPartials& alloc_partials,
    cudaStream_t stream) {
  constexpr int kWide = mta::kVectorWidth<scalar_t>;
  const int64_t run = layout == GhostLayout::ChannelsFirst ? shape.spatial : shape.channels;
  // By shape alone (see the file comment): the entry points aligned x and dy.
  const bool vectorize = run % kWide == 0;
  TORCH_INTERNAL_ASSERT(is_aligned_16(x) && (!Op::kReadsGrad || is_aligned_16(dy)), "ghost BN input not aligned");
  const auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    const bool channels_first = layout == GhostLayout::ChannelsFirst;
    const ReducePlan plan = channels_first ? plan_channels_first(shape, kVec) : plan_channels_last(shape, kVec);
    if (plan.geo.splits > 1) {
      alloc_partials(params, shape.num_ghosts * shape.channels * plan.geo.splits);
    }
    const auto grid = static_cast<unsigned>(plan.grid);
    if (channels_first) {
      reduce_channels_first_kernel<Op, scalar_t, kVec><<<grid, plan.block, 0, stream>>>(x, dy, params, plan.geo);
    } else {
      reduce_channels_last_kernel<Op, scalar_t, kVec><<<grid, plan.block, 0, stream>>>(x, dy, params, plan.geo);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.geo.splits > 1) {
      const int64_t pairs = shape.num_ghosts * shape.channels;
      const int64_t merge_grid = std::min(ceil_div(pairs, kMergeThreads / 32), kMaxGrid);
      merge_partials_kernel<Op><<<static_cast<unsigned>(merge_grid), kMergeThreads, 0, stream>>>(
          params, pairs, plan.geo.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (vectorize) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------------------------
// Statistics (CPU: ghost_statistics_channels_first/_last, affine_coefficients)
// ---------------------------------------------------------------------------

template <typename T>
struct WelfordAcc {
  T mean;
  T m2;  // sum of squared deviations from mean
  int64_t count;
};

// Welford moments; batches of K values enter with Chan's formula (their own
// mean and squared deviations first, taken in registers), so a thread pays
// one division per batch. finalize writes mean, biased var, and the affine
// scale/shift ghost_normalize applies.
template <typename T>
struct WelfordOp {
  using value_t = T;
  using Acc = WelfordAcc<T>;
  static constexpr bool kReadsGrad = false;

  struct Params {
    T* mean;   // [G, C] outputs
    T* var;
    T* scale;  // [G, C] workspace for ghost_normalize
    T* shift;
    ParamRef weight;
    ParamRef bias;
    T eps;
    int64_t channels;
    T* part_mean;  // [G * C * splits] when splits > 1
    T* part_m2;
    int64_t* part_count;
  };

  static __device__ __forceinline__ Acc identity() {
    return Acc{T(0), T(0), 0};
  }

  static __device__ __forceinline__ T context(const Params&, int64_t) {
    return T(0);
  }

  template <int K>
  static __device__ __forceinline__ void add(Acc& acc, const T (&x)[K], const T (&)[K], T) {
    T sum = x[0];
#pragma unroll
    for (int k = 1; k < K; ++k) {
      sum += x[k];
    }
    const T batch_mean = sum / static_cast<T>(K);
    T batch_m2 = T(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const T d = x[k] - batch_mean;
      batch_m2 += d * d;
    }
    if (acc.count == 0) {  // (0 * inf would turn an overflowing delta into NaN below)
      acc = Acc{batch_mean, batch_m2, K};
      return;
    }
    const int64_t count = acc.count + K;
    const T w = static_cast<T>(K) / static_cast<T>(count);
    const T delta = batch_mean - acc.mean;
    acc.mean += delta * w;
    acc.m2 += batch_m2 + delta * delta * (static_cast<T>(acc.count) * w);
    acc.count = count;
  }

  // The rows' count and Chan weight are shared by all V channels: one
  // division per R rows, and one live count instead of V.
  template <int R, int V>
  static __device__ __forceinline__ void add_rows(Acc (&acc)[V], const T (&x)[R][V], const T (&)[R][V],
                                                  const T (&)[V]) {
    const int64_t old = acc[0].count;
    const int64_t count = old + R;
    const T w = static_cast<T>(R) / static_cast<T>(count);
    const T old_w = static_cast<T>(old) * w;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      T sum = x[0][v];
#pragma unroll
      for (int r = 1; r < R; ++r) {
        sum += x[r][v];
      }
      const T batch_mean = sum / static_cast<T>(R);
      T batch_m2 = T(0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const T d = x[r][v] - batch_mean;
        batch_m2 += d * d;
      }
      if (old == 0) {
        acc[v] = Acc{batch_mean, batch_m2, count};
      } else {
        const T delta = batch_mean - acc[v].mean;
        acc[v] = Acc{acc[v].mean + delta * w, acc[v].m2 + batch_m2 + delta * delta * old_w, count};
      }
    }
  }

  static __device__ __forceinline__ Acc merge(const Acc& a, const Acc& b) {
    if (b.count == 0) {
      return a;
    }
    if (a.count == 0) {
      return b;
    }
    const int64_t count = a.count + b.count;
    const T w = static_cast<T>(b.count) / static_cast<T>(count);
    const T delta = b.mean - a.mean;
    return Acc{a.mean + delta * w, a.m2 + b.m2 + delta * delta * (static_cast<T>(a.count) * w), count};
  }

  static __device__ __forceinline__ Acc shfl_down(const Acc& a, int offset) {
    return Acc{
        __shfl_down_sync(kFullMask, a.mean, offset), __shfl_down_sync(kFullMask, a.m2, offset),
        __shfl_down_sync(kFullMask, a.count, offset)};
  }

  // scale = weight * invstd, shift = bias - mean * scale (CPU: affine_coefficients).
  static __device__ __forceinline__ void finalize(const Params& p, int64_t pair, const Acc& acc) {
    const int64_t c = pair % p.channels;
    const T mean = acc.mean;
    const T var = acc.m2 / static_cast<T>(acc.count);  // count >= 2: every ghost has 2+ samples
    p.mean[pair] = mean;
    p.var[pair] = var;
    const T invstd = inverse_std(var, p.eps);
    const T scale = p.weight.get(c, T(1)) * invstd;
    p.scale[pair] = scale;
    p.shift[pair] = p.bias.get(c, T(0)) - mean * scale;
  }

  static __device__ __forceinline__ void store_partial(const Params& p, int64_t i, const Acc& acc) {
    p.part_mean[i] = acc.mean;
    p.part_m2[i] = acc.m2;
    p.part_count[i] = acc.count;
  }

  static __device__ __forceinline__ Acc load_partial(const Params& p, int64_t i) {
    return Acc{p.part_mean[i], p.part_m2[i], p.part_count[i]};
  }
};

// Fills mean/var ([G, C]) and scale/shift ([G * C] each, opmath).
template <typename scalar_t>
void ghost_statistics(
    const at::Tensor& x,
    const Shape& shape,
    GhostLayout layout,
    at::Tensor& mean,
    at::Tensor& var,
    at::Tensor& scale_shift,
    const ParamRef& weight,
    const ParamRef& bias,
    double eps,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  using Op = WelfordOp<T>;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  T* coefficients = scale_shift.mutable_data_ptr<T>();
  typename Op::Params params{
      mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>(), coefficients, coefficients + pairs, weight, bias,
      static_cast<T>(eps), shape.channels, nullptr, nullptr, nullptr};
  // Partials live until the merge kernel, queued on the same stream, has
  // read them: the caching allocator only reuses a block after the work
  // already queued on its stream.
  at::Tensor partials, partial_counts;
  const auto alloc_partials = [&](typename Op::Params& p, int64_t count) {
    partials = at::empty({2 * count}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
    partial_counts = at::empty({count}, x.options().dtype(at::kLong));
    p.part_mean = partials.mutable_data_ptr<T>();
    p.part_m2 = p.part_mean + count;
    p.part_count = partial_counts.mutable_data_ptr<int64_t>();
  };
  run_reduction<Op, scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, params, shape, layout, alloc_partials, stream);
}

// ---------------------------------------------------------------------------
// Normalization (CPU: ghost_normalize)
// ---------------------------------------------------------------------------

// Element e of the dense layout written as mixed-radix digits below the
// ghost index g: ChannelsFirst e = ((g * ghost + n) * C + c) * S + s has
// digits (s, c, n) with radices (S, C, ghost); ChannelsLast
// e = ((g * ghost + n) * S + s) * C + c has (c, s, n) with (C, S, ghost).
// Every ghost but the last has exactly `ghost` samples and the last ends the
// tensor, so this holds for all e < numel.
struct ApplyGeometry {
  int64_t numel;
  int64_t channels;
  int64_t radix0, radix1, radix2;
  int64_t step;  // elements per grid-stride step
  int64_t step0, step1, step2, step_ghost;
};

ApplyGeometry make_apply_geometry(const Shape& shape, GhostLayout layout, int64_t step) {
  ApplyGeometry geo;
  geo.numel = shape.batch * shape.channels * shape.spatial;
  geo.channels = shape.channels;
  const bool channels_first = layout == GhostLayout::ChannelsFirst;
  geo.radix0 = channels_first ? shape.spatial : shape.channels;
  geo.radix1 = channels_first ? shape.channels : shape.spatial;
  geo.radix2 = shape.ghost;
  geo.step = step;
  int64_t rest = step;
  geo.step0 = rest % geo.radix0;
  rest /= geo.radix0;
  geo.step1 = rest % geo.radix1;
  rest /= geo.radix1;
  geo.step2 = rest % geo.radix2;
  geo.step_ghost = rest / geo.radix2;
  return geo;
}

// out = x * coef0 + coef1 (normalize) or out = coef0 * dy - coef1 * x + coef2
// (grad input), coefficients per (ghost, channel) in opmath. A unit of kVec
// elements lies in one row (S % kVec == 0, resp. C % kVec == 0): one
// (ghost, channel) for ChannelsFirst, kVec consecutive channels of one ghost
// for ChannelsLast.
template <typename scalar_t, int kVec, bool kChannelsLast, bool kGrad>
__global__ void __launch_bounds__(kApplyThreads) ghost_apply_kernel(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ dy,
    const at::opmath_type<scalar_t>* __restrict__ coef0,
    const at::opmath_type<scalar_t>* __restrict__ coef1,
    const at::opmath_type<scalar_t>* __restrict__ coef2,
    ApplyGeometry geo) {
  using T = at::opmath_type<scalar_t>;
  int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (e >= geo.numel) {
    return;
  }
  int64_t rest = e;
  int64_t d0 = rest % geo.radix0;
  rest /= geo.radix0;
  int64_t d1 = rest % geo.radix1;
  rest /= geo.radix1;
  int64_t d2 = rest % geo.radix2;
  int64_t g = rest / geo.radix2;
  for (; e < geo.numel; e += geo.step) {
    const int64_t i = g * geo.channels + (kChannelsLast ? d0 : d1);
    T xs[kVec];
    T ds[kVec];
    T ys[kVec];
    load_unit<kVec>(x, e, xs);
    if constexpr (kGrad) {
      load_unit<kVec>(dy, e, ds);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t ik = kChannelsLast ? i + k : i;
      if constexpr (kGrad) {
        // (a*dy - k*x) + d with each product rounded on its own, written out so
        // that no compiler contraction can change the bits.
        ys[k] = (mul_rn(coef0[ik], ds[k]) - mul_rn(coef1[ik], xs[k])) + coef2[ik];
      } else {
        ys[k] = fma_rn(xs[k], coef0[ik], coef1[ik]);  // the CPU's fmadd(x, scale, shift)
      }
    }
    store_unit<kVec>(out, e, ys);
    // Add the step digit by digit; each digit overflows by less than its
    // radix, so one carry at most.
    d0 += geo.step0;
    const int64_t carry0 = d0 >= geo.radix0 ? 1 : 0;
    d0 -= carry0 * geo.radix0;
    d1 += geo.step1 + carry0;
    const int64_t carry1 = d1 >= geo.radix1 ? 1 : 0;
    d1 -= carry1 * geo.radix1;
    d2 += geo.step2 + carry1;
    const int64_t carry2 = d2 >= geo.radix2 ? 1 : 0;
    d2 -= carry2 * geo.radix2;
    g += geo.step_ghost + carry2;
  }
}

// Launches ghost_apply_kernel with as many blocks as the GPU holds at once
// (or fewer for small tensors); the rest is grid-stride.
template <typename scalar_t, bool kGrad>
void run_apply(
    scalar_t* out,
    const scalar_t* x,
    const scalar_t* dy,
    const at::opmath_type<scalar_t>* coef0,
    const at::opmath_type<scalar_t>* coef1,
    const at::opmath_type<scalar_t>* coef2,
    const Shape& shape,
    GhostLayout layout,
    c10::DeviceIndex device,
    cudaStream_t stream) {
  constexpr int kWide = mta::kVectorWidth<scalar_t>;
  const int64_t run = layout == GhostLayout::ChannelsFirst ? shape.spatial : shape.channels;
  const bool vectorize = run % kWide == 0;
  TORCH_INTERNAL_ASSERT(
      is_aligned_16(out) && is_aligned_16(x) && (!kGrad || is_aligned_16(dy)), "ghost BN tensors not aligned");
  const auto launch = [&](auto vec_tag, auto layout_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    constexpr bool kChannelsLast = decltype(layout_tag)::value;
    const auto kernel = ghost_apply_kernel<scalar_t, kVec, kChannelsLast, kGrad>;
    const int64_t resident = static_cast<int64_t>(blocks_per_sm(reinterpret_cast<const void*>(kernel), kApplyThreads,
                                                                device)) *
        multiprocessor_count(device);
    const int64_t units = shape.batch * shape.channels * shape.spatial / kVec;
    const int64_t grid = std::max<int64_t>(1, std::min(ceil_div(units, kApplyThreads), resident));
    const ApplyGeometry geo = make_apply_geometry(shape, layout, grid * kApplyThreads * kVec);
    kernel<<<static_cast<unsigned>(grid), kApplyThreads, 0, stream>>>(out, x, dy, coef0, coef1, coef2, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto with_layout = [&](auto vec_tag) {
    if (layout == GhostLayout::ChannelsLast) {
      launch(vec_tag, std::true_type{});
    } else {
      launch(vec_tag, std::false_type{});
    }
  };
  if (vectorize) {
    with_layout(std::integral_constant<int, kWide>{});
  } else {
    with_layout(std::integral_constant<int, 1>{});
  }
}

template <typename scalar_t>
void ghost_normalize(
    const at::Tensor& x,
    at::Tensor& output,
    const at::Tensor& scale_shift,
    const Shape& shape,
    GhostLayout layout,
    c10::DeviceIndex device,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  const T* scale = scale_shift.const_data_ptr<T>();
  const T* shift = scale + shape.num_ghosts * shape.channels;
  run_apply<scalar_t, false>(
      output.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nullptr, scale, shift, nullptr, shape,
      layout, device, stream);
}

// ---------------------------------------------------------------------------
// Backward sums (CPU: ghost_backward_sums, and grad_coefficients' per-ghost part)
// ---------------------------------------------------------------------------

template <typename T>
struct GradAcc {
  T sum_dy;
  T sum_dy_xmu;
};

// sum_dy and sum_dy_xmu per (ghost, channel). finalize also computes what
// the CPU's grad_coefficients does per (ghost, channel): the grad_weight
// term sum_dy_xmu * invstd and, when dx is wanted, a, k and d.
template <typename T>
struct GradSumsOp {
  using value_t = T;
  using Acc = GradAcc<T>;
  static constexpr bool kReadsGrad = true;

  struct Params {
    const T* mean;  // [G, C] saved statistics
    const T* var;
    ParamRef weight;
    T eps;
    Shape shape;
    T* sum_dy;      // [G * C]: grad_bias terms
    T* weight_term; // [G * C]: sum_dy_xmu * invstd, grad_weight terms
    T* a;           // [G * C] dx coefficients; nullptr without grad_input
    T* k;
    T* d;
    T* part_dy;     // [G * C * splits] when splits > 1
    T* part_dy_xmu;
  };

  static __device__ __forceinline__ Acc identity() {
    return Acc{T(0), T(0)};
  }

  static __device__ __forceinline__ T context(const Params& p, int64_t pair) {
    return p.mean[pair];
  }

  template <int K>
  static __device__ __forceinline__ void add(Acc& acc, const T (&x)[K], const T (&dy)[K], T mean) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc.sum_dy += dy[k];
      acc.sum_dy_xmu += dy[k] * (x[k] - mean);
    }
  }

  template <int R, int V>
  static __device__ __forceinline__ void add_rows(Acc (&acc)[V], const T (&x)[R][V], const T (&dy)[R][V],
                                                  const T (&mean)[V]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc[v].sum_dy += dy[r][v];
        acc[v].sum_dy_xmu += dy[r][v] * (x[r][v] - mean[v]);
      }
    }
  }

  static __device__ __forceinline__ Acc merge(const Acc& a, const Acc& b) {
    return Acc{a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }

  static __device__ __forceinline__ Acc shfl_down(const Acc& a, int offset) {
    return Acc{__shfl_down_sync(kFullMask, a.sum_dy, offset), __shfl_down_sync(kFullMask, a.sum_dy_xmu, offset)};
  }

  // As grad_coefficients on the CPU, for one (ghost, channel).
  static __device__ __forceinline__ void finalize(const Params& p, int64_t pair, const Acc& acc) {
    const int64_t C = p.shape.channels;
    const int64_t g = pair / C;
    const int64_t c = pair - g * C;
    const T invstd = inverse_std(p.var[pair], p.eps);
    p.sum_dy[pair] = acc.sum_dy;
    p.weight_term[pair] = acc.sum_dy_xmu * invstd;
    if (p.a != nullptr) {
      const T n = static_cast<T>(p.shape.ghost_samples(g) * p.shape.spatial);
      const T a = p.weight.get(c, T(1)) * invstd;
      const T k = a * invstd * invstd * acc.sum_dy_xmu / n;
      p.a[pair] = a;
      p.k[pair] = k;
      p.d[pair] = k * p.mean[pair] - a * acc.sum_dy / n;
    }
  }

  static __device__ __forceinline__ void store_partial(const Params& p, int64_t i, const Acc& acc) {
    p.part_dy[i] = acc.sum_dy;
    p.part_dy_xmu[i] = acc.sum_dy_xmu;
  }

  static __device__ __forceinline__ Acc load_partial(const Params& p, int64_t i) {
    return Acc{p.part_dy[i], p.part_dy_xmu[i]};
  }
};

// Fills `work` ([5, G * C] opmath, or [2, G * C] without grad_input):
// sum_dy, sum_dy_xmu * invstd, then a, k, d.
template <typename scalar_t>
void ghost_backward_sums(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& var,
    const ParamRef& weight,
    double eps,
    const Shape& shape,
    GhostLayout layout,
    bool compute_grad_input,
    at::Tensor& work,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  using Op = GradSumsOp<T>;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  T* w = work.mutable_data_ptr<T>();
  typename Op::Params params{
      mean.const_data_ptr<T>(),
      var.const_data_ptr<T>(),
      weight,
      static_cast<T>(eps),
      shape,
      w,
      w + pairs,
      compute_grad_input ? w + 2 * pairs : nullptr,
      compute_grad_input ? w + 3 * pairs : nullptr,
      compute_grad_input ? w + 4 * pairs : nullptr,
      nullptr,
      nullptr};
  at::Tensor partials;  // see ghost_statistics on its lifetime
  const auto alloc_partials = [&](typename Op::Params& p, int64_t count) {
    partials = at::empty({2 * count}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
    p.part_dy = partials.mutable_data_ptr<T>();
    p.part_dy_xmu = p.part_dy + count;
  };
  run_reduction<Op, scalar_t>(
      x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), params, shape, layout, alloc_partials, stream);
}

// ---------------------------------------------------------------------------
// Gradients (CPU: ghost_grad_input, grad_coefficients)
// ---------------------------------------------------------------------------

// grad_bias[c] = sum over g of sum_dy[g, c], grad_weight[c] = sum over g of
// sum_dy_xmu[g, c] * invstd[g, c], ghosts in index order (as the CPU), one
// thread per channel; written in the gradient tensors' dtype.
template <typename T>
__global__ void __launch_bounds__(kChannelThreads) ghost_grad_affine_kernel(
    const T* __restrict__ sum_dy,
    const T* __restrict__ weight_term,
    void* grad_weight,
    void* grad_bias,
    Element kind,
    int64_t num_ghosts,
    int64_t channels) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += stride) {
    T gw = T(0);
    T gb = T(0);
    for (int64_t g = 0; g < num_ghosts; ++g) {
      gw += weight_term[g * channels + c];
      gb += sum_dy[g * channels + c];
    }
    store_element(grad_weight, kind, c, gw);
    store_element(grad_bias, kind, c, gb);
  }
}

template <typename scalar_t>
void ghost_grad_affine(
    const at::Tensor& work,
    const Shape& shape,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  const T* sum_dy = work.const_data_ptr<T>();
  const T* weight_term = sum_dy + shape.num_ghosts * shape.channels;
  const int64_t grid = std::min(ceil_div(shape.channels, kChannelThreads), kMaxGrid);
  ghost_grad_affine_kernel<T><<<static_cast<unsigned>(grid), kChannelThreads, 0, stream>>>(
      sum_dy, weight_term, grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(),
      element_of(grad_weight.scalar_type()), shape.num_ghosts, shape.channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void ghost_grad_input(
    const at::Tensor& dy,
    const at::Tensor& x,
    at::Tensor& grad_input,
    const at::Tensor& work,
    const Shape& shape,
    GhostLayout layout,
    c10::DeviceIndex device,
    cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  const T* a = work.const_data_ptr<T>() + 2 * pairs;
  run_apply<scalar_t, true>(
      grad_input.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), a,
      a + pairs, a + 2 * pairs, shape, layout, device, stream);
}

// ---------------------------------------------------------------------------
// Running statistics (CPU: ghost_update_running_stats)
// ---------------------------------------------------------------------------

// One thread per channel, ghosts in order, the CPU's formulas operation for
// operation. steps_before comes from num_batches_tracked on the device: no
// host read, so the update can be captured in a CUDA graph.
template <typename T>
__global__ void __launch_bounds__(kChannelThreads) ghost_update_running_stats_kernel(
    void* running_mean,
    void* running_var,
    Element kind,
    const int64_t* __restrict__ num_batches_tracked,
    const T* __restrict__ mean,
    const T* __restrict__ var,
    Shape shape,  // spatial = sample_numel
    bool has_momentum,
    double momentum,
    bool average_ghosts) {
  const int64_t C = shape.channels;
  const int64_t steps_before = *num_batches_tracked;
  // step counts from 1, as num_batches_tracked after its increment
  const auto factor = [&](int64_t step) {
    return has_momentum ? static_cast<T>(momentum) : T(1) / static_cast<T>(step);
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += stride) {
    T rm = load_element<T>(running_mean, kind, c);
    T rv = load_element<T>(running_var, kind, c);
    T mean_sum = T(0);
    T var_sum = T(0);
    for (int64_t g = 0; g < shape.num_ghosts; ++g) {
      const int64_t samples = shape.ghost_samples(g);
      const T n = static_cast<T>(samples * shape.spatial);
      const T unbiased = var[g * C + c] * n / (n - T(1));
      if (average_ghosts) {
        mean_sum += static_cast<T>(samples) * mean[g * C + c];
        var_sum += static_cast<T>(samples) * unbiased;
      } else {
        const T f = factor(steps_before + g + 1);
        rm = f * mean[g * C + c] + (T(1) - f) * rm;
        rv = f * unbiased + (T(1) - f) * rv;
      }
    }
    if (average_ghosts) {
      const T f = factor(steps_before + 1);
      const T total = static_cast<T>(shape.batch);
      rm = f * (mean_sum / total) + (T(1) - f) * rm;
      rv = f * (var_sum / total) + (T(1) - f) * rv;
    }
    store_element(running_mean, kind, c, rm);
    store_element(running_var, kind, c, rv);
  }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    int64_t ghost_batch_size,
    double eps) {
  const GhostGeometry geometry = validate_ghost_batch_norm_args(input, weight, bias, ghost_batch_size, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  const c10::DeviceIndex device = input.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const Shape shape = make_shape(geometry);

  const at::Tensor x = aligned_16(input.contiguous(ghost_memory_format(input)));
  at::Tensor output = at::empty_like(x);
  const auto stats_options = x.options().dtype(ghost_stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({shape.num_ghosts, shape.channels}, stats_options);
  at::Tensor var = at::empty({shape.num_ghosts, shape.channels}, stats_options);
  // scale and shift per (ghost, channel); the stats dtype is the opmath type.
  at::Tensor scale_shift = at::empty({2 * shape.num_ghosts * shape.channels}, stats_options);
  at::Tensor weight_c, bias_c;
  const ParamRef weight_ref = param_ref(weight, weight_c);
  const ParamRef bias_ref = param_ref(bias, bias_c);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_batch_norm_cuda", [&] {
    static_assert(
        std::is_same_v<at::opmath_type<scalar_t>, std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>,
        "the statistics dtype (ghost_stats_dtype) must be the opmath type");
    ghost_statistics<scalar_t>(x, shape, geometry.layout, mean, var, scale_shift, weight_ref, bias_ref, eps, stream);
    ghost_normalize<scalar_t>(x, output, scale_shift, shape, geometry.layout, device, stream);
  });
  return {output, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t ghost_batch_size,
    double eps,
    bool compute_grad_input) {
  const GhostGeometry geometry =
      validate_ghost_batch_norm_backward_args(grad_output, input, weight, mean, var, ghost_batch_size, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  const c10::DeviceIndex device = input.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const Shape shape = make_shape(geometry);

  const auto format = ghost_memory_format(input);
  const at::Tensor x = aligned_16(input.contiguous(format));
  const at::Tensor dy = aligned_16(grad_output.contiguous(format));
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor var_c = var.contiguous();
  const bool has_weight = weight.has_value() && weight->defined();
  const auto param_options = has_weight ? weight->options() : mean.options();
  at::Tensor grad_weight = at::empty({shape.channels}, param_options);
  at::Tensor grad_bias = at::empty({shape.channels}, param_options);
  at::Tensor grad_input = compute_grad_input ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor weight_c;
  const ParamRef weight_ref = param_ref(weight, weight_c);
  const int64_t pairs = shape.num_ghosts * shape.channels;
  at::Tensor work = at::empty({(compute_grad_input ? 5 : 2) * pairs}, mean.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_batch_norm_backward_cuda", [&] {
    ghost_backward_sums<scalar_t>(
        dy, x, mean_c, var_c, weight_ref, eps, shape, geometry.layout, compute_grad_input, work, stream);
    ghost_grad_affine<scalar_t>(work, shape, grad_weight, grad_bias, stream);
    if (compute_grad_input) {
      ghost_grad_input<scalar_t>(dy, x, grad_input, work, shape, geometry.layout, device, stream);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

void ghost_batch_norm_update_stats_cuda(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t batch_size,
    int64_t ghost_batch_size,
    int64_t sample_numel,
    std::optional<double> momentum,
    bool average_ghosts) {
  // spatial carries sample_numel (a ghost's values per channel = samples * sample_numel).
  const Shape shape = make_shape(validate_ghost_update_stats_args(
      running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel, momentum));
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(mean.device().index()).stream();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor var_c = var.contiguous();
  const int64_t grid = std::min(ceil_div(shape.channels, kChannelThreads), kMaxGrid);
  // No channels: nothing to update (a zero-block grid is a launch error), but
  // the batch still counts, as on the CPU.
  if (grid > 0) {
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "ghost_batch_norm_update_stats_cuda", [&] {
      ghost_update_running_stats_kernel<scalar_t><<<static_cast<unsigned>(grid), kChannelThreads, 0, stream>>>(
          running_mean.mutable_data_ptr(), running_var.mutable_data_ptr(), element_of(running_mean.scalar_type()),
          num_batches_tracked.const_data_ptr<int64_t>(), mean_c.const_data_ptr<scalar_t>(),
          var_c.const_data_ptr<scalar_t>(), shape, momentum.has_value(), momentum.value_or(0.0), average_ghosts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Queued after the kernel on the same stream: the kernel read the old count.
  num_batches_tracked.add_(average_ghosts ? 1 : shape.num_ghosts);
}

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) {
  m.impl("ghost_batch_norm", &ghost_batch_norm_cuda);
  m.impl("ghost_batch_norm_backward", &ghost_batch_norm_backward_cuda);
  m.impl("ghost_batch_norm_update_stats_", &ghost_batch_norm_update_stats_cuda);
}

}  // namespace swa_fast
