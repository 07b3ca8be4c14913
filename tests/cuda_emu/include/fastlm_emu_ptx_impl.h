// The PTX semantics behind fastlm_emu_ptx.h (ldmatrix, mma.sync), at global scope: the
// wrappers in fastlm_emu_ptx.h are included inside the kernels' namespace.
#pragma once

#include "fastlm_emu.h"
#include "fastlm_emu_half.h"

namespace emu {

inline uint16_t smem_b16(uint32_t addr) {
  auto& smem = rt().smem;
  if (size_t(addr) + 2 > smem.size()) fail("ldmatrix: read past the shared memory");
  uint16_t v;
  std::memcpy(&v, smem.data() + addr, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8m .. 8m+7 hold the addresses of
// rows 0..7 of matrix m (16 bytes each, 16-byte aligned). Register m of lane l receives, without
// .trans, elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix m; with .trans, elements
// (rows 2(l%4), 2(l%4)+1; column l/4). The lower column (row) index goes to the low 16 bits.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans, const char* name) {
  if (addr % 16 != 0) fail(std::string(name) + ": row address not 16-byte aligned");
  if (size_t(addr) + 16 > rt().smem.size())
    fail(std::string(name) + ": row past the shared memory");
  const int l = self().lane;
  warp_collective(name, addr, [&](auto row_addr) {
    for (int m = 0; m < 4; ++m) {
      uint16_t lo, hi;
      if (!trans) {
        const uint32_t a = row_addr(8 * m + l / 4) + 2 * (2 * (l % 4));
        lo = smem_b16(a);
        hi = smem_b16(a + 2);
      } else {
        lo = smem_b16(row_addr(8 * m + 2 * (l % 4)) + 2 * (l / 4));
        hi = smem_b16(row_addr(8 * m + 2 * (l % 4) + 1) + 2 * (l / 4));
      }
      r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  });
}

template <typename T>
inline float b16_to_float(uint16_t v) {
  if constexpr (std::is_same_v<T, __half>) return half_bits_to_float(v);
  else return bf16_bits_to_float(v);
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
};

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32: D = A (16x16) B (16x8) + C, float32
// accumulate. g = lane/4, t = lane%4. A: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same),
// a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9). B: b[0] = (rows 2t, 2t+1;
// col g), b[1] = (rows 2t+8, 2t+9; col g). C/D: c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] =
// (row g+8, cols 2t, 2t+1).
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaIn mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  mine.b[0] = b0;
  mine.b[1] = b1;
  const int l = self().lane, g = l / 4, t = l % 4;
  warp_collective("mma.sync.m16n8k16", mine, [&](auto in) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const MmaIn v = in(lane);
      const int lg = lane / 4, lt = lane % 4;
      for (int reg = 0; reg < 4; ++reg) {
        const int row = lg + 8 * (reg & 1), col = 2 * lt + 8 * (reg >> 1);
        A[row][col] = b16_to_float<T>(uint16_t(v.a[reg] & 0xFFFF));
        A[row][col + 1] = b16_to_float<T>(uint16_t(v.a[reg] >> 16));
      }
      for (int reg = 0; reg < 2; ++reg) {
        const int k = 2 * lt + 8 * reg;
        B[k][lg] = b16_to_float<T>(uint16_t(v.b[reg] & 0xFFFF));
        B[k + 1][lg] = b16_to_float<T>(uint16_t(v.b[reg] >> 16));
      }
    }
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      double acc = 0.0;  // products of 16-bit values are exact in double
      for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
      d[e] = float(double(d[e]) + acc);
    }
  });
}

}  // namespace emu
