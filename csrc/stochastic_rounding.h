// Stochastic rounding to float16/bfloat16, shared by the CPU and CUDA kernels
// of average_stochastic_ (one definition: both devices draw the same bits and
// round the same way, so their results are bitwise equal).
//
// The random bits are counter-based (Philox4x32-10, Salmon et al., SC 2011,
// the generator torch's CUDA RNG uses): the word for element j of tensor t in
// update `counter` under `seed` is a pure function of those four numbers, so
// it depends on no thread count, chunking or launch layout, and a resumed run
// (same seed, same counter) draws what the uninterrupted one would have.
//
// Rounding: r (float32) lies between two adjacent values lo < hi of the
// 16-bit type; the result is hi with probability p = (r - lo) / (hi - lo),
// else lo. hi - lo is a power of two, so p is exact, and p * 2^24 is an
// integer (r has float32's 24 bits, at least 2^13 times finer than the 16-bit
// spacing), so comparing a uniform 24-bit u with p makes P(hi) = p exactly:
// E[result] = r, no bias at all. Values the 16-bit type holds exactly, and
// NaN and +-Inf, are returned as round-to-nearest gives them; a finite r
// beyond the largest finite value rounds to that value (p = 0 against Inf).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "host_device.h"

namespace swa_fast {
namespace stochastic {

struct Words {
  uint32_t w[4];
};

SWA_FAST_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a
// 64-bit key.
SWA_FAST_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kMul0, c0, hi0, lo0);
    mul_hi_lo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words{{c0, c1, c2, c3}};
}

// What every random word of one update shares: the seed and the update's counter.
struct Key {
  uint64_t seed;
  uint64_t counter;
};

// The four words of elements 4g .. 4g+3 of tensor `tensor` (element j takes
// word j % 4 of group g = j / 4).
SWA_FAST_HOST_DEVICE Words group_words(const Key& key, int64_t tensor, int64_t group) {
  const auto g = static_cast<uint64_t>(group);
  return philox4x32_10(
      static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), static_cast<uint32_t>(tensor),
      static_cast<uint32_t>(key.counter), static_cast<uint32_t>(key.seed),
      static_cast<uint32_t>(key.seed >> 32) ^ static_cast<uint32_t>(key.counter >> 32));
}

SWA_FAST_HOST_DEVICE uint32_t element_word(const Key& key, int64_t tensor, int64_t element) {
  return group_words(key, tensor, element >> 2).w[element & 3];
}

// The bit pattern of the 16-bit value next to `bits` (sign-magnitude, both
// types) toward +Inf (`up`) or -Inf; zeros step to the smallest subnormal.
SWA_FAST_HOST_DEVICE uint16_t neighbour_bits(uint16_t bits, bool up) {
  const bool negative = (bits & 0x8000u) != 0;
  const bool zero = (bits & 0x7FFFu) == 0;
  if (zero) {
    return up ? uint16_t{0x0001u} : uint16_t{0x8001u};
  }
  // Away from zero is +1 on the magnitude, toward zero -1.
  return (up != negative) ? static_cast<uint16_t>(bits + 1u) : static_cast<uint16_t>(bits - 1u);
}

// r rounded to T (c10::Half or c10::BFloat16) stochastically with the uniform
// 32-bit `word` (its top 24 bits are used).
template <typename T>
SWA_FAST_HOST_DEVICE T round_stochastically(float r, uint32_t word) {
  const T nearest = static_cast<T>(r);
  const float n = static_cast<float>(nearest);
  if (n == r || !(r - r == 0.0f)) {  // exact, or NaN / Inf (r - r is NaN only for those)
    return nearest;
  }
  const T other(neighbour_bits(nearest.x, r > n), T::from_bits());
  const float o = static_cast<float>(other);
  const float lo = n < o ? n : o;
  const float hi = n < o ? o : n;
  const float p = (r - lo) / (hi - lo);  // exact (see the top of the file)
  const float u = static_cast<float>(word >> 8) * 5.9604644775390625e-8f;  // k / 2^24, k uniform in [0, 2^24)
  const bool take_hi = u < p;
  return (take_hi == (o == hi)) ? other : nearest;
}

}  // namespace stochastic
}  // namespace swa_fast
