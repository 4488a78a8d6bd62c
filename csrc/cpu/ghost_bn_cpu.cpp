// CPU kernels of ghost batch normalization.
//
// Structure (mirrored by csrc/cuda/ghost_bn_cuda.cu):
//   1. entry points validate (ghost_bn_args.h) and lay the input out densely
//      as [N, C, S] (ChannelsFirst) or [N, S, C] (ChannelsLast);
//   2. ghost_statistics: per (ghost, channel) mean and biased variance, one
//      read of the input: each small segment is summed and then its squared
//      deviations taken while it sits in L1, and segments merge with Chan's
//      formula (no sum-of-squares cancellation);
//   3. ghost_normalize: y = x * scale[g, c] + shift[g, c];
//   4. ghost_backward_sums: per (ghost, channel) sums of dy and dy * (x - mean);
//   5. ghost_grad_input: dx = a * dy - k * x + d per (ghost, channel), and
//      grad weight/bias summed over ghosts in order;
//   6. ghost_update_running_stats: running statistics, ghosts in order.
// Arithmetic runs in the opmath type (float; double for double input), fp16
// and bf16 converted in small blocks. Parallel work splits by (ghost,
// channel) or by rows, never inside a sum, so results do not depend on the
// number of threads.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/vec_load.h"
#include "ghost_bn_args.h"
#include "ghost_bn_formulas.h"

namespace swa_fast {
namespace {

constexpr int64_t kBlock = 512;     // elements per conversion block
constexpr int64_t kSegment = 8192;  // elements per statistics segment (stays in L1 between its two passes)
constexpr int64_t kMinChannelBlock = 64;

// ---------------------------------------------------------------------------
// Small vector helpers (opmath values, tails as partial vectors)
// ---------------------------------------------------------------------------

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Sum of v[0..n), two accumulators to hide the add latency.
template <typename T>
T sum_of(const T* v, int64_t n) {
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * Vec<T>::size() <= n; i += 2 * Vec<T>::size()) {
    acc0 = acc0 + Vec<T>::loadu(v + i);
    acc1 = acc1 + Vec<T>::loadu(v + i + Vec<T>::size());
  }
  for (; i < n; i += Vec<T>::size()) {
    const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), n - i));
    acc0 = acc0 + Vec<T>::loadu(v + i, count);  // loadu(ptr, count) zero-fills the rest
  }
  return at::vec::vec_reduce_all([](Vec<T> a, Vec<T> b) { return a + b; }, acc0 + acc1);
}

// Sum of (v[i] - mean)^2 over v[0..n).
template <typename T>
T squared_deviations(const T* v, int64_t n, T mean) {
  const Vec<T> m(mean);
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * Vec<T>::size() <= n; i += 2 * Vec<T>::size()) {
    const Vec<T> d0 = Vec<T>::loadu(v + i) - m;
    const Vec<T> d1 = Vec<T>::loadu(v + i + Vec<T>::size()) - m;
    acc0 = at::vec::fmadd(d0, d0, acc0);
    acc1 = at::vec::fmadd(d1, d1, acc1);
  }
  for (; i < n; i += Vec<T>::size()) {
    const int count = static_cast<int>(std::min<int64_t>(Vec<T>::size(), n - i));
    const Vec<T> d = Vec<T>::set(Vec<T>(T(0)), Vec<T>::loadu(v + i, count) - m, count);
    acc0 = at::vec::fmadd(d, d, acc0);
  }
  return at::vec::vec_reduce_all([](Vec<T> a, Vec<T> b) { return a + b; }, acc0 + acc1);
}

// Calls f(values, offset, count) for v[0..n) in blocks of at most kBlock
// opmath values (converted into `buffer` when scalar_t is not opmath_t).
template <typename opmath_t, typename scalar_t, typename F>
void for_each_block(const scalar_t* v, int64_t n, opmath_t* buffer, const F& f) {
  for (int64_t offset = 0; offset < n; offset += kBlock) {
    const int64_t count = std::min(kBlock, n - offset);
    f(load_as(v + offset, buffer, count), offset, count);
  }
}

// Per-(ghost, channel) running merge of segment statistics (Chan et al.):
// exact for any split, and never subtracts two large sums.
struct Moments {
  double count = 0;
  double mean = 0;
  double m2 = 0;

  void merge(double n, double segment_mean, double segment_m2) {
    const double total = count + n;
    const double delta = segment_mean - mean;
    mean += delta * (n / total);
    m2 += segment_m2 + delta * delta * (count * n / total);
    count = total;
  }
};

// The channel block a ChannelsLast task covers: all channels when there are
// enough ghosts to keep the threads busy, else halves (down to 64 channels,
// a few cache lines per row) until there are.
int64_t channel_block(const GhostGeometry& geo) {
  int64_t block = geo.channels;
  const int64_t wanted_tasks = 4 * at::get_num_threads();
  while (block > kMinChannelBlock && geo.num_ghosts * ((geo.channels + block - 1) / block) < wanted_tasks) {
    block = (block + 1) / 2;
  }
  return block;
}

// ---------------------------------------------------------------------------
// Statistics (CUDA: ghost_statistics)
// ---------------------------------------------------------------------------

// [N, C, S]: one task per (ghost, channel); a segment is a few whole rows of
// S values, or a piece of one row when S is large.
template <typename scalar_t, typename opmath_t>
void ghost_statistics_channels_first(const scalar_t* x, opmath_t* mean, opmath_t* var, const GhostGeometry& geo) {
  const int64_t C = geo.channels, S = geo.spatial;
  const int64_t rows_per_segment = std::max<int64_t>(1, kSegment / S);
  const int64_t piece = std::min(S, kSegment);
  at::parallel_for(0, geo.num_ghosts * C, 1, [&](int64_t first, int64_t last) {
    std::vector<opmath_t> segment(kSegment);
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = task / C, c = task % C;
      const int64_t n_begin = g * geo.ghost_size, n_end = n_begin + geo.ghost_samples(g);
      Moments moments;
      const auto take_segment = [&](int64_t count) {
        const opmath_t segment_mean = sum_of(segment.data(), count) / static_cast<opmath_t>(count);
        moments.merge(count, segment_mean, squared_deviations(segment.data(), count, segment_mean));
      };
      for (int64_t n = n_begin; n < n_end;) {
        if (S >= kSegment) {  // pieces of one row
          const scalar_t* row = x + (n * C + c) * S;
          for (int64_t s = 0; s < S; s += piece) {
            const int64_t count = std::min(piece, S - s);
            copy_as(row + s, segment.data(), count);
            take_segment(count);
          }
          ++n;
        } else {  // whole rows
          const int64_t rows = std::min(rows_per_segment, n_end - n);
          for (int64_t r = 0; r < rows; ++r) {
            copy_as(x + ((n + r) * C + c) * S, segment.data() + r * S, S);
          }
          take_segment(rows * S);
          n += rows;
        }
      }
      mean[task] = static_cast<opmath_t>(moments.mean);
      var[task] = static_cast<opmath_t>(moments.m2 / moments.count);
    }
  });
}

// [N, S, C]: one task per (ghost, channel block); a segment is a few rows of
// the block's channels, summed per channel.
template <typename scalar_t, typename opmath_t>
void ghost_statistics_channels_last(const scalar_t* x, opmath_t* mean, opmath_t* var, const GhostGeometry& geo) {
  const int64_t C = geo.channels, S = geo.spatial;
  const int64_t block = channel_block(geo);
  const int64_t blocks = (C + block - 1) / block;
  const int64_t rows_per_segment = std::max<int64_t>(1, kSegment / block);
  at::parallel_for(0, geo.num_ghosts * blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<opmath_t> segment(rows_per_segment * block), sums(block), m2s(block);
    std::vector<Moments> moments(block);
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = task / blocks, c0 = (task % blocks) * block, width = std::min(block, C - c0);
      const int64_t r_begin = g * geo.ghost_size * S, r_end = r_begin + geo.ghost_samples(g) * S;
      std::fill(moments.begin(), moments.begin() + width, Moments{});
      for (int64_t r = r_begin; r < r_end; r += rows_per_segment) {
        const int64_t rows = std::min(rows_per_segment, r_end - r);
        std::fill(sums.begin(), sums.begin() + width, opmath_t(0));
        std::fill(m2s.begin(), m2s.begin() + width, opmath_t(0));
        for (int64_t i = 0; i < rows; ++i) {
          opmath_t* values = segment.data() + i * width;
          copy_as(x + (r + i) * C + c0, values, width);
          at::vec::map2([](Vec<opmath_t> a, Vec<opmath_t> b) { return a + b; }, sums.data(), sums.data(), values, width);
        }
        for (int64_t j = 0; j < width; ++j) {
          sums[j] /= static_cast<opmath_t>(rows);  // now the segment mean
        }
        for (int64_t i = 0; i < rows; ++i) {
          const opmath_t* values = segment.data() + i * width;
          at::vec::map3(
              [](Vec<opmath_t> m2, Vec<opmath_t> v, Vec<opmath_t> mu) { return at::vec::fmadd(v - mu, v - mu, m2); },
              m2s.data(), m2s.data(), values, sums.data(), width);
        }
        for (int64_t j = 0; j < width; ++j) {
          moments[j].merge(rows, sums[j], m2s[j]);
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        mean[g * C + c0 + j] = static_cast<opmath_t>(moments[j].mean);
        var[g * C + c0 + j] = static_cast<opmath_t>(moments[j].m2 / moments[j].count);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Normalization (CUDA: ghost_normalize)
// ---------------------------------------------------------------------------

// scale = weight * invstd and shift = bias - mean * scale per (ghost, channel).
template <typename opmath_t, typename param_t>
void affine_coefficients(
    const opmath_t* mean, const opmath_t* var, const param_t* weight, const param_t* bias, double eps,
    const GhostGeometry& geo, opmath_t* scale, opmath_t* shift) {
  for (int64_t g = 0; g < geo.num_ghosts; ++g) {
    for (int64_t c = 0; c < geo.channels; ++c) {
      const int64_t i = g * geo.channels + c;
      const opmath_t w = weight ? static_cast<opmath_t>(weight[c]) : opmath_t(1);
      const opmath_t b = bias ? static_cast<opmath_t>(bias[c]) : opmath_t(0);
      const auto affine = ghost::affine_coefficients(mean[i], var[i], w, b, static_cast<opmath_t>(eps));
      scale[i] = affine.scale;
      shift[i] = affine.shift;
    }
  }
}

// y = x * scale + shift over one row of n values; scale/shift are scalars
// (kPerElement false) or arrays indexed like the row (true).
template <bool kPerElement, typename scalar_t, typename opmath_t, typename Coeff>
void affine_row(const scalar_t* x, scalar_t* y, int64_t n, Coeff scale, Coeff shift, opmath_t* buffer) {
  for_each_block(x, n, buffer, [&](const opmath_t* v, int64_t offset, int64_t count) {
    opmath_t* out = output_block(y + offset, buffer + kBlock);
    if constexpr (kPerElement) {
      at::vec::map3(
          [](Vec<opmath_t> a, Vec<opmath_t> s, Vec<opmath_t> t) { return at::vec::fmadd(a, s, t); }, out, v,
          scale + offset, shift + offset, count);
    } else {
      const Vec<opmath_t> s(scale), t(shift);
      at::vec::map([&](Vec<opmath_t> a) { return at::vec::fmadd(a, s, t); }, out, v, count);
    }
    store_from(out, y + offset, count);
  });
}

template <typename scalar_t, typename opmath_t>
void ghost_normalize(
    const scalar_t* x, scalar_t* y, const opmath_t* scale, const opmath_t* shift, const GhostGeometry& geo) {
  const int64_t C = geo.channels, S = geo.spatial;
  if (geo.layout == GhostLayout::ChannelsFirst) {
    at::parallel_for(0, geo.batch * C, std::max<int64_t>(1, kSegment / S), [&](int64_t first, int64_t last) {
      opmath_t buffer[2 * kBlock];
      for (int64_t row = first; row < last; ++row) {
        const int64_t i = (row / C / geo.ghost_size) * C + row % C;
        affine_row<false>(x + row * S, y + row * S, S, scale[i], shift[i], buffer);
      }
    });
  } else {
    at::parallel_for(0, geo.batch * S, std::max<int64_t>(1, kSegment / C), [&](int64_t first, int64_t last) {
      opmath_t buffer[2 * kBlock];
      for (int64_t row = first; row < last; ++row) {
        const int64_t g = row / S / geo.ghost_size;
        affine_row<true>(x + row * C, y + row * C, C, scale + g * C, shift + g * C, buffer);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Backward sums (CUDA: ghost_backward_sums)
// ---------------------------------------------------------------------------

// Per (ghost, channel): sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)),
// each block summed in opmath and blocks added in double.
template <typename scalar_t, typename opmath_t>
void ghost_backward_sums(
    const scalar_t* dy, const scalar_t* x, const opmath_t* mean, const GhostGeometry& geo, opmath_t* sum_dy,
    opmath_t* sum_dy_xmu) {
  const int64_t C = geo.channels, S = geo.spatial;
  if (geo.layout == GhostLayout::ChannelsFirst) {
    at::parallel_for(0, geo.num_ghosts * C, 1, [&](int64_t first, int64_t last) {
      opmath_t dy_buffer[kBlock], x_buffer[kBlock];
      for (int64_t task = first; task < last; ++task) {
        const int64_t g = task / C, c = task % C;
        const Vec<opmath_t> mu(mean[task]);
        double total_dy = 0, total_dy_xmu = 0;
        const int64_t n_begin = g * geo.ghost_size, n_end = n_begin + geo.ghost_samples(g);
        for (int64_t n = n_begin; n < n_end; ++n) {
          const int64_t base = (n * C + c) * S;
          for (int64_t offset = 0; offset < S; offset += kBlock) {
            const int64_t count = std::min(kBlock, S - offset);
            const opmath_t* d = load_as(dy + base + offset, dy_buffer, count);
            const opmath_t* v = load_as(x + base + offset, x_buffer, count);
            total_dy += sum_of(d, count);
            total_dy_xmu += at::vec::map2_reduce_all<opmath_t>(
                [&](Vec<opmath_t> a, Vec<opmath_t> b) { return a * (b - mu); },
                [](Vec<opmath_t> a, Vec<opmath_t> b) { return a + b; }, d, v, count);
          }
        }
        sum_dy[task] = static_cast<opmath_t>(total_dy);
        sum_dy_xmu[task] = static_cast<opmath_t>(total_dy_xmu);
      }
    });
  } else {
    const int64_t block = channel_block(geo);
    const int64_t blocks = (C + block - 1) / block;
    at::parallel_for(0, geo.num_ghosts * blocks, 1, [&](int64_t first, int64_t last) {
      std::vector<opmath_t> dy_buffer(block), x_buffer(block), part_dy(block), part_dy_xmu(block);
      std::vector<double> total_dy(block), total_dy_xmu(block);
      const int64_t rows_per_segment = std::max<int64_t>(1, kSegment / block);
      for (int64_t task = first; task < last; ++task) {
        const int64_t g = task / blocks, c0 = (task % blocks) * block, width = std::min(block, C - c0);
        const opmath_t* mu = mean + g * C + c0;
        const int64_t r_begin = g * geo.ghost_size * S, r_end = r_begin + geo.ghost_samples(g) * S;
        std::fill(total_dy.begin(), total_dy.end(), 0.0);
        std::fill(total_dy_xmu.begin(), total_dy_xmu.end(), 0.0);
        for (int64_t r = r_begin; r < r_end; r += rows_per_segment) {
          std::fill(part_dy.begin(), part_dy.end(), opmath_t(0));
          std::fill(part_dy_xmu.begin(), part_dy_xmu.end(), opmath_t(0));
          for (int64_t row = r; row < std::min(r_end, r + rows_per_segment); ++row) {
            const opmath_t* d = load_as(dy + row * C + c0, dy_buffer.data(), width);
            const opmath_t* v = load_as(x + row * C + c0, x_buffer.data(), width);
            at::vec::map2(
                [](Vec<opmath_t> acc, Vec<opmath_t> a) { return acc + a; }, part_dy.data(), part_dy.data(), d, width);
            at::vec::map4(
                [](Vec<opmath_t> acc, Vec<opmath_t> a, Vec<opmath_t> b, Vec<opmath_t> m) {
                  return at::vec::fmadd(a, b - m, acc);
                },
                part_dy_xmu.data(), part_dy_xmu.data(), d, v, mu, width);
          }
          for (int64_t j = 0; j < width; ++j) {
            total_dy[j] += part_dy[j];
            total_dy_xmu[j] += part_dy_xmu[j];
          }
        }
        for (int64_t j = 0; j < width; ++j) {
          sum_dy[g * C + c0 + j] = static_cast<opmath_t>(total_dy[j]);
          sum_dy_xmu[g * C + c0 + j] = static_cast<opmath_t>(total_dy_xmu[j]);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Gradients (CUDA: ghost_grad_input, ghost_grad_affine)
// ---------------------------------------------------------------------------

// grad_bias = sum over ghosts of sum_dy; grad_weight = sum of sum_dy_xmu *
// invstd, ghosts in order. Per (ghost, channel) dx = a*dy - k*x + d with
// a = w*invstd, k = a*invstd^2*sum_dy_xmu/n, d = k*mean - a*sum_dy/n.
template <typename opmath_t, typename param_t>
void grad_coefficients(
    const opmath_t* mean, const opmath_t* var, const opmath_t* sum_dy, const opmath_t* sum_dy_xmu,
    const param_t* weight, double eps, const GhostGeometry& geo, param_t* grad_weight, param_t* grad_bias,
    opmath_t* a, opmath_t* k, opmath_t* d) {
  const int64_t C = geo.channels;
  for (int64_t c = 0; c < C; ++c) {
    opmath_t gw = 0, gb = 0;
    const opmath_t w = weight ? static_cast<opmath_t>(weight[c]) : opmath_t(1);
    for (int64_t g = 0; g < geo.num_ghosts; ++g) {
      const int64_t i = g * C + c;
      const opmath_t n = static_cast<opmath_t>(geo.ghost_samples(g) * geo.spatial);
      const auto coef =
          ghost::grad_coefficients(mean[i], var[i], sum_dy[i], sum_dy_xmu[i], w, static_cast<opmath_t>(eps), n);
      gw += coef.weight_term;
      gb += sum_dy[i];
      a[i] = coef.a;
      k[i] = coef.k;
      d[i] = coef.d;
    }
    grad_weight[c] = static_cast<param_t>(gw);
    grad_bias[c] = static_cast<param_t>(gb);
  }
}

// dx = a*dy - k*x + d over one row of n values; coefficients are scalars or
// arrays indexed like the row.
template <bool kPerElement, typename scalar_t, typename opmath_t, typename Coeff>
void grad_input_row(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, Coeff a, Coeff k, Coeff d, opmath_t* buffer) {
  for (int64_t offset = 0; offset < n; offset += kBlock) {
    const int64_t count = std::min(kBlock, n - offset);
    const opmath_t* g = load_as(dy + offset, buffer, count);
    const opmath_t* v = load_as(x + offset, buffer + kBlock, count);
    opmath_t* out = output_block(dx + offset, buffer + 2 * kBlock);
    if constexpr (kPerElement) {
      at::vec::map4(
          [](Vec<opmath_t> gv, Vec<opmath_t> xv, Vec<opmath_t> av, Vec<opmath_t> kv) {
            return av * gv - kv * xv;
          },
          out, g, v, a + offset, k + offset, count);
      at::vec::map2([](Vec<opmath_t> o, Vec<opmath_t> dv) { return o + dv; }, out, out, d + offset, count);
    } else {
      const Vec<opmath_t> av(a), kv(k), dv(d);
      at::vec::map2([&](Vec<opmath_t> gv, Vec<opmath_t> xv) { return av * gv - kv * xv + dv; }, out, g, v, count);
    }
    store_from(out, dx + offset, count);
  }
}

template <typename scalar_t, typename opmath_t>
void ghost_grad_input(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const opmath_t* a, const opmath_t* k, const opmath_t* d,
    const GhostGeometry& geo) {
  const int64_t C = geo.channels, S = geo.spatial;
  if (geo.layout == GhostLayout::ChannelsFirst) {
    at::parallel_for(0, geo.batch * C, std::max<int64_t>(1, kSegment / S), [&](int64_t first, int64_t last) {
      opmath_t buffer[3 * kBlock];
      for (int64_t row = first; row < last; ++row) {
        const int64_t i = (row / C / geo.ghost_size) * C + row % C;
        grad_input_row<false>(dy + row * S, x + row * S, dx + row * S, S, a[i], k[i], d[i], buffer);
      }
    });
  } else {
    at::parallel_for(0, geo.batch * S, std::max<int64_t>(1, kSegment / C), [&](int64_t first, int64_t last) {
      opmath_t buffer[3 * kBlock];
      for (int64_t row = first; row < last; ++row) {
        const int64_t g = row / S / geo.ghost_size;
        grad_input_row<true>(dy + row * C, x + row * C, dx + row * C, C, a + g * C, k + g * C, d + g * C, buffer);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Running statistics (CUDA: ghost_update_running_stats)
// ---------------------------------------------------------------------------

// One channel per iteration, the formulas of ghost::update_running_channel
// (shared with the CUDA kernel); geo.spatial is sample_numel here.
template <typename stat_t, typename opmath_t>
void ghost_update_running_stats(
    stat_t* running_mean, stat_t* running_var, int64_t steps_before, const opmath_t* mean, const opmath_t* var,
    const GhostGeometry& geo, std::optional<double> momentum, bool average_ghosts) {
  // A few flops per (ghost, channel): threads cost more than they save below ~16k channels.
  at::parallel_for(0, geo.channels, 1 << 14, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      opmath_t rm = static_cast<opmath_t>(running_mean[c]);
      opmath_t rv = static_cast<opmath_t>(running_var[c]);
      ghost::update_running_channel(rm, rv, mean, var, c, geo, steps_before, momentum.has_value(),
                                    momentum.value_or(0.0), average_ghosts);
      running_mean[c] = static_cast<stat_t>(rm);
      running_var[c] = static_cast<stat_t>(rv);
    }
  });
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_cpu(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    int64_t ghost_batch_size,
    double eps) {
  const GhostGeometry geo = validate_ghost_batch_norm_args(input, weight, bias, ghost_batch_size, eps);
  if (input.numel() == 0) {
    return empty_ghost_batch_norm(input, geo);
  }
  const at::Tensor x = input.contiguous(ghost_memory_format(input));
  at::Tensor output = at::empty_like(x);
  const auto stats_options = x.options().dtype(ghost_stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({geo.num_ghosts, geo.channels}, stats_options);
  at::Tensor var = at::empty({geo.num_ghosts, geo.channels}, stats_options);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  // The kernels index weight/bias densely: a strided view (w[::2]) is copied.
  const at::Tensor weight_c = has_weight ? weight->contiguous() : at::Tensor();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  const auto param_dtype =
      has_weight ? weight->scalar_type() : (has_bias ? bias->scalar_type() : x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_batch_norm_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    if (geo.layout == GhostLayout::ChannelsFirst) {
      ghost_statistics_channels_first(x_ptr, mean.data_ptr<opmath_t>(), var.data_ptr<opmath_t>(), geo);
    } else {
      ghost_statistics_channels_last(x_ptr, mean.data_ptr<opmath_t>(), var.data_ptr<opmath_t>(), geo);
    }
    std::vector<opmath_t> scale(geo.num_ghosts * geo.channels), shift(geo.num_ghosts * geo.channels);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype, "ghost_batch_norm_cpu_param", [&] {
      using param_t = scalar_t;
      affine_coefficients<opmath_t, param_t>(
          mean.const_data_ptr<opmath_t>(), var.const_data_ptr<opmath_t>(),
          has_weight ? weight_c.const_data_ptr<param_t>() : nullptr, has_bias ? bias_c.const_data_ptr<param_t>() : nullptr,
          eps, geo, scale.data(), shift.data());
    });
    ghost_normalize(x_ptr, output.data_ptr<scalar_t>(), scale.data(), shift.data(), geo);
  });
  return {output, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t ghost_batch_size,
    double eps,
    bool compute_grad_input) {
  const GhostGeometry geo =
      validate_ghost_batch_norm_backward_args(grad_output, input, weight, mean, var, ghost_batch_size, eps);
  if (input.numel() == 0) {
    return empty_ghost_batch_norm_backward(input, weight, mean, geo, compute_grad_input);
  }
  const auto format = ghost_memory_format(input);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor dy = grad_output.contiguous(format);
  const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  const bool has_weight = weight.has_value() && weight->defined();
  const at::Tensor weight_c = has_weight ? weight->contiguous() : at::Tensor();
  const auto param_options = has_weight ? weight->options() : mean.options();
  at::Tensor grad_weight = at::empty({geo.channels}, param_options);
  at::Tensor grad_bias = at::empty({geo.channels}, param_options);
  at::Tensor grad_input = compute_grad_input ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_batch_norm_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t stats = geo.num_ghosts * geo.channels;
    std::vector<opmath_t> sum_dy(stats), sum_dy_xmu(stats), a(stats), k(stats), d(stats);
    ghost_backward_sums(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<opmath_t>(), geo,
        sum_dy.data(), sum_dy_xmu.data());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_weight.scalar_type(), "ghost_bn_bwd_param", [&] {
      using param_t = scalar_t;
      grad_coefficients<opmath_t, param_t>(
          mean_c.const_data_ptr<opmath_t>(), var_c.const_data_ptr<opmath_t>(), sum_dy.data(), sum_dy_xmu.data(),
          has_weight ? weight_c.const_data_ptr<param_t>() : nullptr, eps, geo, grad_weight.data_ptr<param_t>(),
          grad_bias.data_ptr<param_t>(), a.data(), k.data(), d.data());
    });
    if (compute_grad_input) {
      ghost_grad_input(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), a.data(),
          k.data(), d.data(), geo);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

void ghost_batch_norm_update_stats_cpu(
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
  const GhostGeometry geo = validate_ghost_update_stats_args(
      running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel, momentum);
  if (updates_running_stats(geo)) {
    const int64_t steps_before = num_batches_tracked.item<int64_t>();  // a CPU scalar: free to read
    const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "ghost_bn_update_stats_cpu", [&] {
      using opmath_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "ghost_bn_running", [&] {
        ghost_update_running_stats<scalar_t, opmath_t>(
            running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(), steps_before,
            mean_c.const_data_ptr<opmath_t>(), var_c.const_data_ptr<opmath_t>(), geo, momentum, average_ghosts);
      });
    });
  }
  // An empty batch still counts, as nn.BatchNorm counts it.
  num_batches_tracked.add_(average_ghosts ? 1 : geo.num_ghosts);
}

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CPU, m) {
  m.impl("ghost_batch_norm", &ghost_batch_norm_cpu);
  m.impl("ghost_batch_norm_backward", &ghost_batch_norm_backward_cpu);
  m.impl("ghost_batch_norm_update_stats_", &ghost_batch_norm_update_stats_cpu);
}

}  // namespace swa_fast
