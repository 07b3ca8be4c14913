// Guarded memory for the CUDA emulator (fastlm_emu.h): every global allocation made while an
// emulated op runs, every block's dynamic shared memory and every static __shared__ array is
// its own mapping, placed so that it ends (16-byte aligned) at a page end, with PROT_NONE guard
// pages on both sides. An access past either end faults; the emulator's SIGSEGV handler (active
// only while a kernel runs) turns the fault into a launch failure that names the kernel, the
// block, the thread, the address and the object it missed. The bytes between the page start and
// the object (and the < 16 bytes after it) hold a canary checked after every block (shared) and
// every launch (global), so a write there fails too. Fresh memory is poison: 0xFF bytes (NaN in
// every float type).
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <string>

namespace emu {

constexpr unsigned char kPoison = 0xFF;
constexpr unsigned char kCanary = 0xCB;

struct Region {
  char* map = nullptr;  // the whole mapping: [guard_lo][pages][guard_hi]
  size_t map_size = 0;
  char* lo = nullptr;  // the readable pages [lo, hi)
  char* hi = nullptr;
  char* base = nullptr;  // the object [base, base + size), base + round16(size) == hi
  size_t size = 0;
  const char* kind = "";  // "global allocation", "dynamic shared memory", ...
};

inline size_t page_size() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

// Every live region by its mapping's start (the fault handler looks addresses up here).
inline std::map<char*, Region*>& regions() {
  static std::map<char*, Region*> m;
  return m;
}

inline void fill_canary(const Region& r) {
  std::memset(r.lo, kCanary, size_t(r.base - r.lo));
  std::memset(r.base + r.size, kCanary, size_t(r.hi - (r.base + r.size)));
}

// The first byte of the slack around the object that is no longer the canary, or null.
inline const char* canary_broken(const Region& r) {
  for (const char* p = r.lo; p < r.base; ++p)
    if (static_cast<unsigned char>(*p) != kCanary) return p;
  for (const char* p = r.base + r.size; p < r.hi; ++p)
    if (static_cast<unsigned char>(*p) != kCanary) return p;
  return nullptr;
}

// Maps an object of `size` bytes with `guard_lo` / `guard_hi` bytes of PROT_NONE around it.
inline bool map_region(Region& r, size_t size, size_t guard_lo, size_t guard_hi, const char* kind) {
  const size_t pg = page_size();
  const size_t rounded = (size + 15) & ~size_t(15);
  const size_t pages = std::max<size_t>(pg, (rounded + pg - 1) / pg * pg);
  guard_lo = (guard_lo + pg - 1) / pg * pg;
  guard_hi = (guard_hi + pg - 1) / pg * pg;
  void* m = mmap(nullptr, guard_lo + pages + guard_hi, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS |
                 MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return false;
  r.map = static_cast<char*>(m);
  r.map_size = guard_lo + pages + guard_hi;
  r.lo = r.map + guard_lo;
  r.hi = r.lo + pages;
  if (mprotect(r.lo, pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(m, r.map_size);
    return false;
  }
  r.base = r.hi - rounded;
  r.size = size;
  r.kind = kind;
  fill_canary(r);
  regions()[r.map] = &r;
  return true;
}

inline void unmap_region(Region& r) {
  if (r.map == nullptr) return;
  regions().erase(r.map);
  munmap(r.map, r.map_size);
  r = Region{};
}

// "N bytes past the end of the <kind> of M bytes at 0x..." for an address in or near a region.
inline std::string describe_address(const void* addr) {
  const char* a = static_cast<const char*>(addr);
  std::ostringstream os;
  os << "address " << addr;
  auto& m = regions();
  auto it = m.upper_bound(const_cast<char*>(a));
  if (it == m.begin()) return os.str() + " (no emulator allocation near it)";
  --it;
  const Region& r = *it->second;
  if (a >= r.map + r.map_size) return os.str() + " (no emulator allocation near it)";
  if (a < r.base)
    os << ", " << (r.base - a) << " bytes before the start of";
  else if (a >= r.base + r.size)
    os << ", " << (a - (r.base + r.size)) << " bytes past the end of";
  else
    os << ", " << (a - r.base) << " bytes into";
  os << " the " << r.kind << " of " << r.size << " bytes at " << static_cast<const void*>(r.base);
  return os.str();
}

}  // namespace emu
