// Runtime ISA dispatch for the C++ CPU kernels, shared by every csrc/cpu/*.cpp.
//
// A function marked FASTLM_CLONES is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA)
// and baseline x86-64 (GCC target_clones) and the best one for the machine is picked at load
// time, so the extension stays portable (setup.py passes no -march). x86-64-v3 rather than
// plain "avx2": -mavx2 does not enable FMA. Code that should be compiled for each clone's ISA
// must be inlined into the clone: mark it FASTLM_INLINE. Also here: the float32 conversions of
// the element types, shared by the kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FASTLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLM_CLONES __attribute__((target_clones("fma", "default")))  // GCC 10: no ISA levels
#else
#define FASTLM_CLONES
#endif

#define FASTLM_INLINE inline __attribute__((always_inline))

namespace fastlm {

FASTLM_INLINE float to_f(float v) { return v; }
FASTLM_INLINE float to_f(c10::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
FASTLM_INLINE float to_f(c10::Half v) { return static_cast<float>(v); }

template <typename T>
FASTLM_INLINE T from_f(float v) {
  return static_cast<T>(v);  // round to nearest even, NaN kept (c10 conversions)
}

}  // namespace fastlm
