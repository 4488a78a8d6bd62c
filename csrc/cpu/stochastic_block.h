// stochastic_rounding.h for a block of consecutive elements on the CPU: the
// same words and the same rounding, computed lane-wise over small arrays so
// that every loop vectorizes (Philox's rounds for eight groups at once in
// AVX2 builds, else a loop over the groups the compiler vectorizes; the
// conversions with at::vec). Calling the scalar functions per element instead
// cost about 8 ns an element on one core: Philox once per four elements and a
// branch per element. The results are bitwise the scalar functions':
// tests/test_average_stochastic.py checks the words of both Philox paths
// (swa_fast._C.stochastic_words) and the rounded values against an
// independent emulation, and the CUDA kernel, which calls the scalar
// functions, against the CPU.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu/vec_load.h"
#include "stochastic_rounding.h"

namespace swa_fast {
namespace stochastic {
namespace cpu {

constexpr int64_t kMaxBlock = 512;  // elements per block, at most
constexpr int64_t kMaxGroups = kMaxBlock / 4 + 1;  // + 1: a block need not start at a group

// Whether this build has the AVX2 Philox (the portable loop runs otherwise,
// and on the last groups of a block that do not fill eight lanes).
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kHasSimdPhilox = true;

// hi, lo: the 32-bit halves of the products of a's eight 32-bit lanes with
// the multiplier m (in every 32-bit lane). _mm256_mul_epu32 multiplies the
// even lanes only; the odd ones are shifted down into even places.
inline void mul_hi_lo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Eight groups' counters (x0..x3, one group per 32-bit lane) through one
// Philox round under the round's key (key0, key1 in every lane): philox_round.
inline void philox_round_avx2(__m256i& x0, __m256i& x1, __m256i& x2, __m256i& x3, __m256i key0, __m256i key1) {
  __m256i hi0, lo0, hi1, lo1;
  mul_hi_lo_avx2(x0, _mm256_set1_epi32(static_cast<int>(kPhiloxMul0)), hi0, lo0);
  mul_hi_lo_avx2(x2, _mm256_set1_epi32(static_cast<int>(kPhiloxMul1)), hi1, lo1);
  x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), key0);
  x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), key1);
  x1 = lo1;
  x3 = lo0;
}

// philox4x32_10 on groups [0, 16 * (groups / 16)) of the counter arrays, in
// place, all ten rounds in registers; returns how many groups it did. Two
// sets of eight lanes go through the rounds side by side: each round waits on
// the previous one's multiplies, and the second set fills that wait.
inline int64_t philox_simd(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, int64_t groups, uint32_t k0,
                           uint32_t k1) {
  const auto load = [](const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); };
  const auto store = [](uint32_t* p, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); };
  int64_t i = 0;
  for (; i + 16 <= groups; i += 16) {
    __m256i a0 = load(c0 + i), a1 = load(c1 + i), a2 = load(c2 + i), a3 = load(c3 + i);
    __m256i b0 = load(c0 + i + 8), b1 = load(c1 + i + 8), b2 = load(c2 + i + 8), b3 = load(c3 + i + 8);
    uint32_t r0 = k0;
    uint32_t r1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(r0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int>(r1));
      philox_round_avx2(a0, a1, a2, a3, key0, key1);
      philox_round_avx2(b0, b1, b2, b3, key0, key1);
      r0 += kWeyl0;
      r1 += kWeyl1;
    }
    store(c0 + i, a0), store(c1 + i, a1), store(c2 + i, a2), store(c3 + i, a3);
    store(c0 + i + 8, b0), store(c1 + i + 8, b1), store(c2 + i + 8, b2), store(c3 + i + 8, b3);
  }
  return i;
}
#else
constexpr bool kHasSimdPhilox = false;
#endif

// words[e] = element_word(key, tensor, first + e) for e < n <= kMaxBlock.
// `simd`: the AVX2 rounds where the build has them (false: the portable loop
// only, which tests compare with them).
inline void block_words(const Key& key, int64_t tensor, int64_t first, int64_t n, uint32_t* words,
                        bool simd = kHasSimdPhilox) {
  alignas(64) uint32_t c0[kMaxGroups];
  alignas(64) uint32_t c1[kMaxGroups];
  alignas(64) uint32_t c2[kMaxGroups];
  alignas(64) uint32_t c3[kMaxGroups];
  const int64_t first_group = first >> 2;
  const int64_t groups = ((first + n - 1) >> 2) - first_group + 1;
  const uint32_t stream = stream_word(tensor);
  const uint32_t counter = counter_word(key);
  for (int64_t i = 0; i < groups; ++i) {
    const auto g = static_cast<uint64_t>(first_group + i);
    c0[i] = static_cast<uint32_t>(g);
    c1[i] = static_cast<uint32_t>(g >> 32);
    c2[i] = stream;
    c3[i] = counter;
  }
  int64_t done = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if (simd) {
    done = philox_simd(c0, c1, c2, c3, groups, key_word0(key), key_word1(key));
  }
#endif
  // The rest: rounds outside, groups inside, so that each round is one
  // vectorizable loop.
  uint32_t k0 = key_word0(key);
  uint32_t k1 = key_word1(key);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int64_t i = done; i < groups; ++i) {
      philox_round(c0[i], c1[i], c2[i], c3[i], k0, k1);
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  // Element first + e is word (first + e) % 4 of group (first + e) / 4.
  alignas(64) uint32_t interleaved[4 * kMaxGroups];
  for (int64_t i = 0; i < groups; ++i) {
    interleaved[4 * i] = c0[i];
    interleaved[4 * i + 1] = c1[i];
    interleaved[4 * i + 2] = c2[i];
    interleaved[4 * i + 3] = c3[i];
  }
  const uint32_t* element_words = interleaved + (first & 3);
  for (int64_t e = 0; e < n; ++e) {
    words[e] = element_words[e];
  }
}

// u[e] = uniform(element_word(key, tensor, first + e)) for e < n <= kMaxBlock.
inline void block_uniforms(const Key& key, int64_t tensor, int64_t first, int64_t n, float* u) {
  alignas(64) uint32_t words[kMaxBlock];
  block_words(key, tensor, first, n, words);
  for (int64_t e = 0; e < n; ++e) {
    u[e] = uniform(words[e]);
  }
}

// out[e] = round_stochastically<T>(r[e], the word u[e] came from) for e < n <= kMaxBlock.
template <typename T>
void round_block(const float* r, const float* u, T* out, int64_t n) {
  // The 16-bit values as plain bits (the vectorizer takes no c10::Half or
  // BFloat16 struct), viewed as T only by at::vec::convert.
  alignas(64) uint16_t nearest[kMaxBlock];
  alignas(64) uint16_t other[kMaxBlock];
  alignas(64) float n_value[kMaxBlock];
  alignas(64) float o_value[kMaxBlock];
  at::vec::convert(r, reinterpret_cast<T*>(nearest), n);  // round to nearest even, as static_cast<T> rounds
  widen_to_float(reinterpret_cast<const T*>(nearest), n_value, n);
  for (int64_t e = 0; e < n; ++e) {
    other[e] = neighbour_bits(nearest[e], r[e] > n_value[e]);
  }
  widen_to_float(reinterpret_cast<const T*>(other), o_value, n);
  uint16_t* out_bits = reinterpret_cast<uint16_t*>(out);
  uint32_t any_nan = 0;  // an integer: the vectorizer reduces no bool
  for (int64_t e = 0; e < n; ++e) {
    const uint16_t picked = pick_bits(r[e], n_value[e], o_value[e], nearest[e], other[e], u[e]);
    out_bits[e] = keeps_nearest(r[e], n_value[e]) ? nearest[e] : picked;
    any_nan |= static_cast<uint32_t>(r[e] != r[e]);
  }
  // NaN's bits: at::vec's conversion and static_cast<T> (and CUDA's) may give
  // different NaNs; the scalar cast's are the definition.
  if (any_nan != 0) {
    for (int64_t e = 0; e < n; ++e) {
      if (r[e] != r[e]) {
        out[e] = static_cast<T>(r[e]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace stochastic
}  // namespace swa_fast
