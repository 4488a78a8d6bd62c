// The floating dtypes the kernels compute with, and the dispatch over them,
// shared by every op's checks (csrc/*_args.cpp) and kernels.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace swa_fast {

// Precision rank of a floating dtype the kernels handle: 1 for float16 and
// bfloat16, 2 for float32, 3 for float64; 0 for anything else. float8/float4
// (floating in c10's sense), complex and integer dtypes have no arithmetic
// kernel here.
inline int float_rank(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half:
    case c10::ScalarType::BFloat16:
      return 1;
    case c10::ScalarType::Float:
      return 2;
    case c10::ScalarType::Double:
      return 3;
    default:
      return 0;
  }
}

// float16, bfloat16, float32 or float64.
inline bool is_kernel_float(c10::ScalarType t) {
  return float_rank(t) > 0;
}

// float16 or bfloat16 (computed in float32).
inline bool is_reduced_float(c10::ScalarType t) {
  return float_rank(t) == 1;
}

// A C++ type as a value, for generic lambdas: f(TypeTag<float>{}).
template <typename T>
struct TypeTag {
  using type = T;
};

// The same rank for the C++ types (constexpr, to compile only supported pairs).
template <typename T>
constexpr int float_rank_of() {
  if constexpr (std::is_same_v<T, double>) {
    return 3;
  } else if constexpr (std::is_same_v<T, float>) {
    return 2;
  } else if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return 1;
  } else {
    return 0;
  }
}

// f(TypeTag<T>{}) for the kernel float `dtype` (op names the caller in the error).
template <typename F>
void dispatch_kernel_float(const char* op, c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(TypeTag<float>{});
    case c10::ScalarType::Double:
      return f(TypeTag<double>{});
    case c10::ScalarType::Half:
      return f(TypeTag<c10::Half>{});
    case c10::ScalarType::BFloat16:
      return f(TypeTag<c10::BFloat16>{});
    default:
      TORCH_CHECK(false, op, ": no kernel for ", dtype, " (the checks should have refused it)");
  }
}

}  // namespace swa_fast
