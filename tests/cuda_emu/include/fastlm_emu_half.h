// __half and __nv_bfloat16 for the CUDA emulator (fastlm_emu.h): storage types with the
// round-to-nearest-even conversions of cuda_fp16.h / cuda_bf16.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu {

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f2u(f);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  const uint32_t rounding = 0x7FFF + ((u >> 16) & 1);
  return uint16_t((u + rounding) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return u2f(uint32_t(b) << 16); }

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const int exp = (h >> 10) & 0x1F;
  const uint32_t mant = h & 0x3FF;
  if (exp == 0x1F) return u2f(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    const float v = std::ldexp(float(mant), -24);
    return sign ? -v : v;
  }
  return u2f(sign | (uint32_t(exp - 15 + 127) << 23) | (mant << 13));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = f2u(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  if (std::isnan(f)) return uint16_t(sign | 0x7E00);
  const float a = std::fabs(f);
  if (a >= 65520.f) return uint16_t(sign | 0x7C00);  // rounds to infinity
  if (a < std::ldexp(1.f, -14)) {                    // subnormal (or zero): units of 2^-24
    const float q = std::nearbyint(a * 16777216.f);  // round half to even (default mode)
    return uint16_t(sign | uint16_t(q));
  }
  const int exp = int((u >> 23) & 0xFF) - 127;
  uint32_t mant = u & 0x7FFFFF;
  uint32_t h = (uint32_t(exp + 15) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // carries into the exponent correctly
  return uint16_t(sign | h);
}

}  // namespace emu

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using __nv_half = __half;

inline float __half2float(__half h) { return emu::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_bits_to_float(b.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{emu::float_to_bf16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
