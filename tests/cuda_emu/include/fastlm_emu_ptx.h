// The PTX instructions of csrc/cuda/attention.cu for the CUDA emulator (fastlm_emu.h), written
// from the PTX ISA's definitions (sections "cp.async", "ldmatrix", and "Matrix Fragments for
// mma.m16n8k16 with floating point type"), independently of the kernels that use them. The
// wrappers have the kernels' names and signatures; attention.cu includes this file in place of
// its inline-asm wrappers when FASTLM_CUDA_EMU is defined.
#pragma once

#include "fastlm_emu_ptx_impl.h"

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async.cg.shared.global [dst], [src], 16, src_size: 16 bytes, of which src_size are read
// and the rest zero-filled. Lands by the wait that retires its group (see cp_async_commit).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  auto& r = ::emu::rt();
  if (dst % 16 != 0 || size_t(dst) + 16 > r.smem.size())
    ::emu::fail("cp.async: shared address " + std::to_string(dst) +
                " not 16-byte aligned or past " + std::to_string(r.smem.size()) +
                " bytes of shared memory");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0)
    ::emu::fail("cp.async: global source address not 16-byte aligned");
  ::emu::self().pending.push_back(::emu::Copy{dst, src, valid ? 16 : 0});
}

inline void cp_async_land(const std::vector<::emu::Copy>& group) {
  auto& smem = ::emu::rt().smem;
  for (const ::emu::Copy& c : group) {
    std::memset(smem.data() + c.dst, 0, 16);
    if (c.bytes) std::memcpy(smem.data() + c.dst, c.src, size_t(c.bytes));
  }
}

// cp.async.commit_group. The copies may land at any time up to the wait that retires the group:
// the emulator lands a random half of the groups at once, the others at that wait.
__device__ __forceinline__ void cp_async_commit() {
  ::emu::Fiber& f = ::emu::self();
  if (::emu::rt().rng() & 1) {
    cp_async_land(f.pending);
    f.groups.emplace_back();  // an empty group keeps wait_group's count
  } else {
    f.groups.push_back(std::move(f.pending));
  }
  f.pending.clear();
}

// cp.async.wait_group N: all but the newest N committed groups of this thread have landed.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::emu::Fiber& f = ::emu::self();
  while (f.groups.size() > size_t(N)) {
    cp_async_land(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}


__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  ::emu::ldmatrix_x4(r, addr, false, "ldmatrix.x4");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  ::emu::ldmatrix_x4(r, addr, true, "ldmatrix.x4.trans");
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  ::emu::mma_m16n8k16<T>(d, a, b0, b1);
}
