// Stochastic rounding to float16/bfloat16, shared by the CPU and CUDA kernels
// of average_stochastic_ (one definition: both devices draw the same bits and
// round the same way, so their results are bitwise equal). The CPU kernel runs
// the same functions lane-wise over blocks (cpu/stochastic_block.h).
//
// The random bits are counter-based (Philox4x32-10, Salmon et al., SC 2011,
// the generator torch's CUDA RNG uses): the word for element j of tensor t in
// update `counter` under `seed` is a pure function of those four numbers, so
// it depends on no thread count, chunking or launch layout, and a resumed run
// (same seed, same counter) draws what the uninterrupted one would have.
//
// Rounding: r (float32) lies between two adjacent values lo < hi of the
// 16-bit type; the result is hi with probability p = (r - lo) / (hi - lo),
// else lo, drawn by comparing p with u = k / 2^24, k the word's top 24 bits.
// hi - lo is a power of two, so p is computed exactly whenever r - lo is,
// and then P(hi) = p exactly (E[result] = r, no bias) as long as p * 2^24 is
// an integer. It is for every bfloat16 rounding (float32 has 16 more bits at
// every exponent, subnormals included) and for float16 where |r| >= 2^-25
// (13 more bits over float16's normal range; float16's subnormal spacing is
// 2^-24, float32's is at most 2^-48 there). Below 2^-25, a quarter of
// float16's smallest subnormal, p is quantized up to a multiple of 2^-24:
// P(hi) exceeds p by less than 2^-24, a bias under 2^-48 in value. Values the
// 16-bit type holds exactly, and NaN and +-Inf, are returned as
// round-to-nearest gives them; a finite r beyond the largest finite value
// rounds to that value (of either sign).
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

constexpr uint32_t kPhiloxMul0 = 0xD2511F53u;
constexpr uint32_t kPhiloxMul1 = 0xCD9E8D57u;

// One of Philox4x32's rounds: the counter (c0..c3) mixed under the round's
// key (k0, k1).
SWA_FAST_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                       uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mul_hi_lo(kPhiloxMul0, c0, hi0, lo0);
  mul_hi_lo(kPhiloxMul1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

constexpr int kPhiloxRounds = 10;
// The key's Weyl increments between rounds.
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a
// 64-bit key.
SWA_FAST_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
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

// The Philox key of one update, and the two counter words every element of it
// shares (the others are the element's group, 64 bits).
SWA_FAST_HOST_DEVICE uint32_t key_word0(const Key& key) {
  return static_cast<uint32_t>(key.seed);
}
SWA_FAST_HOST_DEVICE uint32_t key_word1(const Key& key) {
  return static_cast<uint32_t>(key.seed >> 32) ^ static_cast<uint32_t>(key.counter >> 32);
}
SWA_FAST_HOST_DEVICE uint32_t stream_word(int64_t tensor) {
  return static_cast<uint32_t>(tensor);
}
SWA_FAST_HOST_DEVICE uint32_t counter_word(const Key& key) {
  return static_cast<uint32_t>(key.counter);
}

// The four words of elements 4g .. 4g+3 of tensor `tensor` (element j takes
// word j % 4 of group g = j / 4).
SWA_FAST_HOST_DEVICE Words group_words(const Key& key, int64_t tensor, int64_t group) {
  const auto g = static_cast<uint64_t>(group);
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), stream_word(tensor),
                       counter_word(key), key_word0(key), key_word1(key));
}

SWA_FAST_HOST_DEVICE uint32_t element_word(const Key& key, int64_t tensor, int64_t element) {
  return group_words(key, tensor, element >> 2).w[element & 3];
}

// The bit pattern of the 16-bit value next to `bits` (sign-magnitude, both
// types) toward +Inf (`up`) or -Inf; zeros step to the smallest subnormal.
// Written without branches (selects and masks) here and below, so that the
// CPU's block form (cpu/stochastic_block.h) vectorizes.
SWA_FAST_HOST_DEVICE uint16_t neighbour_bits(uint16_t bits, bool up) {
  const uint32_t b = bits;
  const uint32_t negative = b >> 15;
  const uint32_t zero_mask = 0u - static_cast<uint32_t>((b & 0x7FFFu) == 0u);
  const uint32_t away = static_cast<uint32_t>(up) ^ negative;  // away from zero: +1 on the magnitude, else -1
  const uint32_t stepped = b + 2u * away - 1u;
  const uint32_t from_zero = 0x0001u | (static_cast<uint32_t>(!up) << 15);  // +-smallest subnormal
  return static_cast<uint16_t>((from_zero & zero_mask) | (stepped & ~zero_mask));
}

// The uniform k / 2^24 of a word, k its top 24 bits (through int32: exact,
// k < 2^24, and a conversion every SIMD unit has).
SWA_FAST_HOST_DEVICE float uniform(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>(word >> 8)) * 5.9604644775390625e-8f;
}

// r not exactly representable and finite: the bits of the result, between
// `nearest` (value n, r rounded to nearest) and `other` (value o, the
// neighbour of nearest on r's side), for the uniform u. Beyond the largest
// finite value one of the two is +-Inf: the finite one is the result (for
// r > 0 p is 0 against Inf anyway; for r < 0 it is Inf / Inf, NaN).
SWA_FAST_HOST_DEVICE uint16_t pick_bits(float r, float n, float o, uint16_t nearest, uint16_t other, float u) {
  const bool other_is_hi = n < o;
  const float lo = other_is_hi ? n : o;
  const float hi = other_is_hi ? o : n;
  const float p = (r - lo) / (hi - lo);  // exact where it matters (see the top of the file)
  const bool take_hi = u < p;
  const bool nearest_infinite = !(n - n == 0.0f);
  const bool other_infinite = !(o - o == 0.0f);
  const bool take_other = ((take_hi == other_is_hi) | nearest_infinite) & !other_infinite;
  return take_other ? other : nearest;
}

// Whether r is returned rounded to nearest: exact (n == r), or NaN / Inf (r -
// r is NaN only for those). `|`, not `||`: both sides are cheap, and a
// short circuit is a branch.
SWA_FAST_HOST_DEVICE bool keeps_nearest(float r, float n) {
  return (n == r) | !(r - r == 0.0f);
}

// r rounded to T (c10::Half or c10::BFloat16) stochastically with the uniform
// 32-bit `word` (its top 24 bits are used).
template <typename T>
SWA_FAST_HOST_DEVICE T round_stochastically(float r, uint32_t word) {
  const T nearest = static_cast<T>(r);
  const float n = static_cast<float>(nearest);
  if (keeps_nearest(r, n)) {
    return nearest;
  }
  const T other(neighbour_bits(nearest.x, r > n), T::from_bits());
  return T(pick_bits(r, n, static_cast<float>(other), nearest.x, other.x, uniform(word)), T::from_bits());
}

}  // namespace stochastic
}  // namespace swa_fast
