// The reduction engine of ghost batch norm's CUDA kernels: per (ghost,
// channel) sums over the input (statistics) or over input and gradient
// (backward), for any Op (see below), in a fixed order, without atomics.
//
// Every (ghost, channel) sum is cut into `splits` contiguous pieces; one block
// reduces one piece of one pair (ChannelsFirst) or of a tile of channels
// (ChannelsLast). With one split the block finishes the pair itself; with
// more, each block writes a partial to a workspace and a small kernel (one
// warp per pair) merges the partials in index order. The split count depends
// on the shape only (never on the GPU), threads and warps merge in a fixed
// tree (cuda/block_reduce.cuh): the same inputs give the same bits on every
// run.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "cuda/block_reduce.cuh"
#include "cuda/ghost_bn_common.cuh"
#include "cuda/vector_access.cuh"

namespace swa_fast {
namespace ghost {

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

static_assert(kReduceThreads % 32 == 0 && kMergeThreads % 32 == 0, "blocks of whole warps");

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
  GhostGeometry shape;
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
    const int64_t first_sample = g * geo.shape.ghost_size;
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
          vec::load_converted<kVec>(x, offset, xs + r * kVec);
          if constexpr (Op::kReadsGrad) {
            vec::load_converted<kVec>(dy, offset, ds + r * kVec);
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
        vec::load_converted<kVec>(x, offset, xs);
        if constexpr (Op::kReadsGrad) {
          vec::load_converted<kVec>(dy, offset, ds);
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
    acc = reduce::block_reduce<Op>(acc, warp_results);
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
    const int64_t first_row = g * geo.shape.ghost_size * S;
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
          vec::load_converted<kVec>(x, offset, xs[u]);
          if constexpr (Op::kReadsGrad) {
            vec::load_converted<kVec>(dy, offset, ds[u]);
          }
          offset += row_step;
        }
        Op::template add_rows<kRows, kVec>(acc, xs, ds, context);
      }
      for (; r < end; r += by) {
        T xs[1][kVec];
        T ds[1][kVec];
        vec::load_converted<kVec>(x, offset, xs[0]);
        if constexpr (Op::kReadsGrad) {
          vec::load_converted<kVec>(dy, offset, ds[0]);
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
    acc = reduce::warp_reduce<Op>(acc);
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
inline int64_t choose_splits(int64_t groups, int64_t elements) {
  if (groups >= kTargetReduceBlocks) {
    return 1;
  }
  int64_t splits = ceil_div(kTargetReduceBlocks, groups);
  splits = std::min(splits, std::max<int64_t>(1, elements / kMinSplitElements));
  return std::min(splits, kMaxSplits);
}

inline ReducePlan plan_channels_first(const GhostGeometry& shape, int vec) {
  ReducePlan plan;
  const int64_t pairs = shape.num_ghosts * shape.channels;
  const int64_t splits = choose_splits(pairs, shape.ghost_size * shape.spatial);
  // Threads: 512, halved while a thread would get fewer than kUnroll units.
  const int64_t units_per_split = ceil_div(shape.ghost_size * (shape.spatial / vec), splits);
  int threads = kReduceThreads;
  while (threads > 32 && static_cast<int64_t>(threads) * kUnroll > units_per_split) {
    threads /= 2;
  }
  plan.geo = ReduceGeometry{shape, splits, 1, pairs * splits};
  plan.block = dim3(static_cast<unsigned>(threads));
  plan.grid = std::min(plan.geo.tasks, kMaxGrid);
  return plan;
}

inline ReducePlan plan_channels_last(const GhostGeometry& shape, int vec) {
  ReducePlan plan;
  const int64_t channel_units = shape.channels / vec;
  // Up to a warp along the channels (32 x 16 bytes: four rows of 128 bytes
  // per warp load); fewer when there are fewer channels.
  const int tx = static_cast<int>(std::min<int64_t>(32, next_power_of_two(channel_units)));
  const int64_t tiles = ceil_div(channel_units, tx);
  const int64_t tile_channels = std::min<int64_t>(shape.channels, static_cast<int64_t>(tx) * vec);
  const int64_t rows_per_ghost = shape.ghost_size * shape.spatial;
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
    const GhostGeometry& shape,
    GhostLayout layout,
    const AllocPartials& alloc_partials,
    cudaStream_t stream) {
  constexpr int kWide = vec::kVectorWidth<scalar_t>;
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

}  // namespace ghost
}  // namespace swa_fast
