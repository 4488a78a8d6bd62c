// Loading reduced-precision values into the arithmetic type, shared by the
// CPU kernels: fp16/bf16 are converted in small caller-provided blocks with
// at::vec::convert (float16 widened by widen_to_float); values already in the
// arithmetic type are used in place.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace swa_fast {

// dst[0..n) = src[0..n) widened to float32. float16 goes through
// at::vec::load_to_float (F16C, a vector at a time): at::vec has no float16 ->
// float32 specialization of convert, whose generic loop converts one value at
// a time (0.51 against 0.36 ns a value measured on AVX2). Others (bfloat16,
// which convert's loop handles as fast) through at::vec::convert.
template <typename T>
void widen_to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    using Vec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v;
      at::vec::load_to_float(src + i, v);
      v.store(dst + i);
    }
    for (; i < n; ++i) {
      dst[i] = static_cast<float>(src[i]);
    }
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Converts n values to the arithmetic type into `buffer`; returns src itself
// (no copy) when it already has that type. Keeps src's constness.
template <typename opmath_t, typename T>
auto load_as(T* src, opmath_t* buffer, int64_t n) {
  using result_t = std::conditional_t<std::is_const_v<T>, const opmath_t*, opmath_t*>;
  if constexpr (std::is_same_v<std::remove_const_t<T>, opmath_t>) {
    return static_cast<result_t>(src);
  } else if constexpr (std::is_same_v<opmath_t, float>) {
    widen_to_float(static_cast<const std::remove_const_t<T>*>(src), buffer, n);
    return static_cast<result_t>(buffer);
  } else {
    at::vec::convert(src, buffer, n);
    return static_cast<result_t>(buffer);
  }
}

// Where a block of results in the arithmetic type is computed: straight into
// the destination when it has that type, else into `buffer` (then store_from).
template <typename opmath_t, typename T>
opmath_t* output_block(T* destination, opmath_t* buffer) {
  if constexpr (std::is_same_v<T, opmath_t>) {
    return destination;
  } else {
    return buffer;
  }
}

// Writes values computed in `buffer` (see output_block / load_as) to dst;
// nothing to do when they were computed in place.
template <typename opmath_t, typename T>
void store_from(const opmath_t* values, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, opmath_t>) {
    at::vec::convert(values, dst, n);
  }
}

// dst[0..n) = src[0..n) in dst's type: a memcpy when the types match.
template <typename S, typename D>
void copy_as(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, n * sizeof(D));
  } else {
    at::vec::convert(src, dst, n);
  }
}

}  // namespace swa_fast
