// Runtime ISA dispatch for the C++ CPU kernels, shared by every csrc/cpu/*.cpp.
//
// A function marked FASTLM_CLONES is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA)
// and baseline x86-64 (GCC target_clones) and the best one for the machine is picked at load
// time, so the extension stays portable (setup.py passes no -march). x86-64-v3 rather than
// plain "avx2": -mavx2 does not enable FMA. Code that should be compiled for each clone's ISA
// must be inlined into the clone: mark it FASTLM_INLINE.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FASTLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLM_CLONES __attribute__((target_clones("fma", "default")))  // GCC 10: no ISA levels
#else
#define FASTLM_CLONES
#endif

#define FASTLM_INLINE inline __attribute__((always_inline))
