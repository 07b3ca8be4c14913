// The PTX decoder and interpreter of the CUDA emulator. build.py rewrites every inline asm
// statement of csrc/cuda, e.g.
//     asm volatile("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
// into
//     do { static const ::emu::ptx::Program _emu_asm("mul.rn.f32 %0, %1, %2;", "ptx.h:77");
//          _emu_asm.run({::emu::ptx::out<'f', '='>(r), ::emu::ptx::in<'f'>(a),
//                        ::emu::ptx::in<'f'>(b)}); } while (0);
// so the string the GPU build assembles is the one decoded here: opcode and modifiers are
// checked against the PTX ISA's syntax of the instruction (an unknown, missing or misplaced
// modifier fails), operands against their count and constraint letters, and the instruction's
// semantics run from the ISA's definition (written independently of the kernels).
//
// Adding an instruction (tests/cuda_emu/README.md): a decode function that consumes the
// modifiers with Mods (in the ISA's order) and checks the operands, plus an exec function; one
// line in the table of `decode`. Asynchronous instructions issue an emu::AsyncOp that completes
// at a random scheduling point or at its wait.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "fastlm_emu.h"
#include "fastlm_emu_half.h"

namespace emu {
namespace ptx {

// One asm operand: its constraint letter, direction ('i' input, '=' output, '+' both), the
// output's address and the input's bits.
struct Opnd {
  char c;
  char dir;
  void* p;
  uint64_t v;
};

template <char C, typename T>
inline Opnd in(const T& x) {
  Opnd o{C, 'i', nullptr, 0};
  if constexpr (std::is_pointer_v<T>) {
    static_assert(C == 'l', "a pointer operand needs the \"l\" constraint");
    o.v = uint64_t(reinterpret_cast<uintptr_t>(x));
  } else if constexpr (std::is_floating_point_v<T>) {
    static_assert((C == 'f' && sizeof(T) == 4) || (C == 'd' && sizeof(T) == 8),
                  "a float operand needs \"f\", a double \"d\"");
    if constexpr (sizeof(T) == 4) o.v = f2u(x);
    else std::memcpy(&o.v, &x, 8);
  } else {
    static_assert(std::is_integral_v<T> || std::is_enum_v<T>, "unsupported operand type");
    static_assert(C == 'r' || C == 'l' || C == 'h' || C == 'n' || C == 'c',
                  "an integer operand needs \"r\", \"l\", \"h\" or \"n\"");
    o.v = uint64_t(int64_t(x));
    if (C == 'r') o.v &= 0xFFFFFFFFull;
    if (C == 'h') o.v &= 0xFFFFull;
  }
  return o;
}

template <char C, char D, typename T>
inline Opnd out(T& x) {
  static_assert(!std::is_const_v<T>, "an output operand must be assignable");
  static_assert((C == 'f' && std::is_same_v<T, float>) || (C == 'd' && std::is_same_v<T, double>) ||
                    (C == 'r' && std::is_integral_v<T> && sizeof(T) == 4) ||
                    (C == 'l' && std::is_integral_v<T> && sizeof(T) == 8) ||
                    (C == 'h' && std::is_integral_v<T> && sizeof(T) == 2),
                "output operand type does not match its constraint");
  Opnd o{C, D, &x, 0};
  if (D == '+') {
    if constexpr (sizeof(T) == 4) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      o.v = u;
    } else if constexpr (sizeof(T) == 8) {
      std::memcpy(&o.v, &x, 8);
    } else {
      uint16_t u;
      std::memcpy(&u, &x, 2);
      o.v = u;
    }
  }
  return o;
}

// A decoded operand: a register (%N or a .reg local), an immediate, an address [reg + off], or
// a vector {r, r, ...} (registers `vec` in Insn::regs).
struct Arg {
  enum Kind : uint8_t { kReg, kImm, kAddr, kVec, kSink } kind = kImm;
  int reg = -1;      // kReg / kAddr: register index (operands first, then locals)
  int64_t imm = 0;   // kImm / kAddr offset
  int vbegin = 0, vn = 0;  // kVec: Insn::vregs[vbegin .. vbegin + vn)
};

struct Program;
struct Insn;
struct Ctx {
  uint64_t* reg;
  const Program* prog;
  const Opnd* ops;  // the asm statement's operands (asynchronous results write through them)
};
using Exec = void (*)(const Insn&, Ctx&);

struct Insn {
  Exec exec = nullptr;
  const char* kind = "";  // what the decoder made of it (emu_ptx_decode): "ldmatrix", ...
  std::string op;  // the full opcode with modifiers, for messages
  std::vector<Arg> args;
  std::vector<int> vregs;
  int guard = -1;  // predicate register, or -1
  bool guard_neg = false;
  // Decoded attributes (meaning per instruction).
  int a = 0, b = 0, c = 0, d = 0;
};

// Register kinds the decoder checks operands against.
enum class Ty : uint8_t { kB16, kB32, kB64, kF32, kF64, kPred, kImm };

constexpr int kMaxRegs = 512;

struct Program {
  std::string text, where, error;
  std::vector<Insn> insns;
  int nops = 0;                     // %0 .. %(nops-1)
  std::vector<Ty> local_ty;         // .reg locals, after the operands
  std::vector<std::string> local_name;
  std::vector<std::string> wants;   // per operand: the constraint letters the text accepts
  mutable bool checked = false;     // the call site's constraints were checked

  Program(const char* t, const char* w);
  void run(std::initializer_list<Opnd> ops) const;
  [[noreturn]] void bad(const Insn* insn, const std::string& what) const {
    fail("PTX `" + (insn ? insn->op : text) + "` (" + where + "): " + what);
  }
};

// ---------------------------------------------------------------------------------------------
// Modifiers of an opcode, consumed in the ISA's order.
struct Mods {
  std::vector<std::string> t;  // "sync", "aligned", "m8n8", ...
  size_t i = 0;
  std::string* err;
  bool take(const char* m) {
    if (i < t.size() && t[i] == m) {
      ++i;
      return true;
    }
    return false;
  }
  // Index of the option taken, or -1.
  int one_of(std::initializer_list<const char*> opts) {
    int k = 0;
    for (const char* o : opts) {
      if (take(o)) return k;
      ++k;
    }
    return -1;
  }
  void missing(const std::string& what) {
    if (!err->empty()) return;
    if (i < t.size()) *err = "unknown or misplaced modifier ." + t[i] + " (expected " + what + ")";
    else *err = "missing modifier " + what;
  }
  bool need(const char* m) {
    if (take(m)) return true;
    missing(std::string(".") + m);
    return false;
  }
  int need_one(std::initializer_list<const char*> opts, const char* what) {
    const int k = one_of(opts);
    if (k < 0) missing(what);
    return k;
  }
  void end() {
    if (i < t.size() && err->empty()) *err = "unknown or misplaced modifier ." + t[i];
  }
};

// ---------------------------------------------------------------------------------------------
// Register access.
inline uint32_t u32(const Ctx& c, const Arg& a) {
  return a.kind == Arg::kImm ? uint32_t(a.imm) : uint32_t(c.reg[a.reg]);
}
inline uint64_t u64(const Ctx& c, const Arg& a) {
  return a.kind == Arg::kImm ? uint64_t(a.imm) : c.reg[a.reg];
}
inline float f32(const Ctx& c, const Arg& a) { return u2f(u32(c, a)); }
inline void set32(Ctx& c, const Arg& a, uint32_t v) {
  if (a.kind == Arg::kReg) c.reg[a.reg] = v;
}
inline uint64_t addr(const Ctx& c, const Arg& a) { return c.reg[a.reg] + uint64_t(a.imm); }

// ---------------------------------------------------------------------------------------------
// Float arithmetic: {add,sub,mul}{.rn}{.ftz}{.sat}.f32, div.rn{.ftz}.f32, sqrt.rn{.ftz}.f32,
// setp.cmp{.ftz}.f32, selp.type. Only round-to-nearest is emulated (the host's IEEE float
// operations, g++ -ffp-contract=off); .rz/.rm/.rp and .approx fail as not emulated.
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }

inline void exec_arith(const Insn& in, Ctx& c) {
  float x = f32(c, in.args[1]), y = in.a == 4 ? 0.f : f32(c, in.args[2]);
  if (in.b) {
    x = ftz(x);
    y = ftz(y);
  }
  float r;
  switch (in.a) {
    case 0: r = x + y; break;
    case 1: r = x - y; break;
    case 2: r = x * y; break;
    case 3: r = x / y; break;
    default: r = std::sqrt(x); break;
  }
  if (in.b) r = ftz(r);
  if (in.c) r = std::isnan(r) ? 0.f : std::min(1.f, std::max(0.f, r));
  set32(c, in.args[0], f2u(r));
}

inline void exec_setp(const Insn& in, Ctx& c) {
  float x = f32(c, in.args[1]), y = f32(c, in.args[2]);
  if (in.b) {
    x = ftz(x);
    y = ftz(y);
  }
  const bool nan = std::isnan(x) || std::isnan(y);
  bool r = false;
  switch (in.a) {  // eq ne lt le gt ge, then the unordered forms, num, nan
    case 0: r = !nan && x == y; break;
    case 1: r = !nan && x != y; break;
    case 2: r = !nan && x < y; break;
    case 3: r = !nan && x <= y; break;
    case 4: r = !nan && x > y; break;
    case 5: r = !nan && x >= y; break;
    case 6: r = nan || x == y; break;
    case 7: r = nan || x != y; break;
    case 8: r = nan || x < y; break;
    case 9: r = nan || x <= y; break;
    case 10: r = nan || x > y; break;
    case 11: r = nan || x >= y; break;
    case 12: r = !nan; break;
    default: r = nan; break;
  }
  c.reg[in.args[0].reg] = r;
}

inline void exec_selp(const Insn& in, Ctx& c) {
  const bool p = c.reg[in.args[3].reg] != 0;
  set32(c, in.args[0], p ? u32(c, in.args[1]) : u32(c, in.args[2]));
}

// ---------------------------------------------------------------------------------------------
// cp.async.{ca,cg}.shared{::cta}.global [dst], [src], cp-size{, src-size}: copies cp-size bytes
// (4, 8 or 16; .cg: 16) of which src-size are read and the rest zero-filled; the copy belongs
// to the next commit_group and lands at a random point up to the wait_group that retires it.
inline void exec_cp_async(const Insn& in, Ctx& c) {
  const int size = int(in.args[2].imm);
  const int bytes = in.args.size() > 3 ? int(u32(c, in.args[3])) : size;
  const uint64_t dst = addr(c, in.args[0]);
  const void* src = reinterpret_cast<const void*>(addr(c, in.args[1]));
  if (dst % uint64_t(size) != 0)
    c.prog->bad(&in, "shared address " + std::to_string(dst) + " not " + std::to_string(size) +
                         "-byte aligned");
  if (reinterpret_cast<uintptr_t>(src) % uintptr_t(size) != 0)
    c.prog->bad(&in, "global source address not " + std::to_string(size) + "-byte aligned");
  if (bytes < 0 || bytes > size)
    c.prog->bad(&in, "src-size " + std::to_string(bytes) + " outside [0, " +
                         std::to_string(size) + "]");
  unsigned char* d = shared_ptr(dst, size_t(size), "cp.async");
  if (bytes > 0) {  // the source must be readable now (a fault names this thread)
    volatile const unsigned char* s = static_cast<const unsigned char*>(src);
    (void)s[0];
    (void)s[bytes - 1];
  }
  self().pending.push_back(Copy{d, src, bytes, size});
}

// cp.async.commit_group: the copies issued since the last commit become one group. A quarter
// of the groups land at once, the others at a random scheduling point up to their wait.
inline void exec_cp_commit(const Insn&, Ctx&) {
  Fiber& f = self();
  auto op = std::make_shared<AsyncOp>();
  op->copies.swap(f.pending);
  auto started = async_start(op);
  if ((rt().rng() & 3) == 0) async_finish(started);
  f.groups.push_back(std::move(started));
}

// cp.async.wait_group N (a = N) / cp.async.wait_all (a = -1: commits the pending copies first).
inline void exec_cp_wait(const Insn& in, Ctx& c) {
  Fiber& f = self();
  size_t keep = 0;
  if (in.a >= 0) {
    keep = size_t(in.args[0].kind == Arg::kImm ? in.args[0].imm : int64_t(c.reg[in.args[0].reg]));
  } else if (!f.pending.empty()) {
    exec_cp_commit(in, c);
  }
  while (f.groups.size() > keep) {
    async_finish(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared{::cta}.b16 {r..}, [addr]: lanes 8m..8m+7
// hold the 16-byte row addresses of matrix m (rows 0..7). Register m of lane l receives, without
// .trans, elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix m; with .trans, elements
// (rows 2(l%4), 2(l%4)+1; column l/4). The lower column (row) index goes to the low 16 bits.
// a = number of matrices, b = trans.
inline void exec_ldmatrix(const Insn& in, Ctx& c) {
  const uint32_t a = uint32_t(addr(c, in.args[1]));
  const int num = in.a, lane = self().lane;
  if (lane < 8 * num) {
    if (a % 16 != 0) c.prog->bad(&in, "row address " + std::to_string(a) + " not 16-byte aligned");
    shared_ptr(a, 16, "ldmatrix");  // in bounds
  }
  uint32_t r[4] = {0, 0, 0, 0};
  warp_collective(in.b ? "ldmatrix.trans" : "ldmatrix", a, [&](auto row_addr) {
    auto b16 = [&](uint32_t x) {
      uint16_t v;
      std::memcpy(&v, shared_ptr(x, 2, "ldmatrix"), 2);
      return v;
    };
    const int l = lane;
    for (int m = 0; m < num; ++m) {
      uint16_t lo, hi;
      if (!in.b) {
        const uint32_t x = row_addr(8 * m + l / 4) + 2 * (2 * (l % 4));
        lo = b16(x);
        hi = b16(x + 2);
      } else {
        lo = b16(row_addr(8 * m + 2 * (l % 4)) + 2 * (l / 4));
        hi = b16(row_addr(8 * m + 2 * (l % 4) + 1) + 2 * (l / 4));
      }
      r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  });
  const Arg& v = in.args[0];
  for (int m = 0; m < num; ++m) c.reg[in.vregs[v.vbegin + m]] = r[m];
}

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 {d0..3}, {a0..3}, {b0,b1},
// {c0..3}: D = A (16x16) B (16x8) + C, float32 accumulate. g = lane/4, t = lane%4. A: a[0] =
// (row g, cols 2t, 2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row
// g+8, cols 2t+8, 2t+9). B: b[0] = (rows 2t, 2t+1; col g), b[1] = (rows 2t+8, 2t+9; col g).
// C/D: c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1).
// a = 1 for f16 inputs, 0 for bf16.
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
};

inline void exec_mma(const Insn& in, Ctx& c) {
  const Arg &D = in.args[0], &A = in.args[1], &B = in.args[2], &C = in.args[3];
  auto vr = [&](const Arg& v, int i) -> uint64_t& { return c.reg[in.vregs[v.vbegin + i]]; };
  MmaIn mine;
  for (int i = 0; i < 4; ++i) mine.a[i] = uint32_t(vr(A, i));
  for (int i = 0; i < 2; ++i) mine.b[i] = uint32_t(vr(B, i));
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = u2f(uint32_t(vr(C, i)));
  const bool f16 = in.a == 1;
  auto cvt = [f16](uint16_t v) { return f16 ? half_bits_to_float(v) : bf16_bits_to_float(v); };
  const int l = self().lane, g = l / 4, t = l % 4;
  float d[4];
  warp_collective("mma.sync.m16n8k16", mine, [&](auto lane_in) {
    __attribute__((uninitialized)) float Am[16][16], Bm[16][8];  // every element set below
    for (int lane = 0; lane < 32; ++lane) {
      const MmaIn v = lane_in(lane);
      const int lg = lane / 4, lt = lane % 4;
      for (int reg = 0; reg < 4; ++reg) {
        const int row = lg + 8 * (reg & 1), col = 2 * lt + 8 * (reg >> 1);
        Am[row][col] = cvt(uint16_t(v.a[reg] & 0xFFFF));
        Am[row][col + 1] = cvt(uint16_t(v.a[reg] >> 16));
      }
      for (int reg = 0; reg < 2; ++reg) {
        const int k = 2 * lt + 8 * reg;
        Bm[k][lg] = cvt(uint16_t(v.b[reg] & 0xFFFF));
        Bm[k + 1][lg] = cvt(uint16_t(v.b[reg] >> 16));
      }
    }
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      double s = 0.0;  // products of 16-bit values are exact in double
      for (int k = 0; k < 16; ++k) s += double(Am[row][k]) * double(Bm[k][col]);
      d[e] = float(double(acc[e]) + s);
    }
  });
  for (int i = 0; i < 4; ++i) vr(D, i) = f2u(d[i]);
}

// ---------------------------------------------------------------------------------------------
// The decoder.
// The Hopper instructions (fastlm_emu_sm90.h, included at the end): true when `base` is one.
template <typename Dec, typename ModsT>
bool decode_sm90(Dec& d, const std::string& base, ModsT& m, const std::vector<std::string>& args,
                 Insn& in);

namespace detail {

inline bool is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r'; }

inline std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && is_space(s[a])) ++a;
  while (b > a && is_space(s[b - 1])) --b;
  return s.substr(a, b - a);
}

// Splits at top-level commas (outside braces and brackets).
inline std::vector<std::string> split_args(const std::string& s) {
  std::vector<std::string> out;
  int depth = 0;
  std::string cur;
  for (char ch : s) {
    if (ch == '{' || ch == '[') ++depth;
    if (ch == '}' || ch == ']') --depth;
    if (ch == ',' && depth == 0) {
      out.push_back(trim(cur));
      cur.clear();
    } else {
      cur += ch;
    }
  }
  if (!trim(cur).empty() || !out.empty()) out.push_back(trim(cur));
  return out;
}

struct Decoder {
  Program& p;
  std::vector<std::vector<std::pair<std::string, int>>> scopes{{}};
  std::string err;

  int lookup(const std::string& name) {
    for (auto s = scopes.rbegin(); s != scopes.rend(); ++s)
      for (auto& kv : *s)
        if (kv.first == name) return kv.second;
    return -1;
  }

  // A register operand: %N (its constraint letter must be one of `cons`) or a local of type ty.
  bool reg(const std::string& s, Arg& a, const char* cons, Ty ty) {
    if (s.size() >= 2 && s[0] == '%' && std::isdigit(static_cast<unsigned char>(s[1]))) {
      const int n = std::atoi(s.c_str() + 1);
      if (!*cons) {
        err = s + ": a predicate must be a .reg .pred local";
        return false;
      }
      if (n >= p.nops) p.nops = n + 1;
      if (int(p.wants.size()) <= n) p.wants.resize(n + 1);
      if (p.wants[n].empty()) p.wants[n] = cons;
      else if (p.wants[n] != cons) {
        err = "operand " + s + " is used as two different types";
        return false;
      }
      a.kind = Arg::kReg;
      a.reg = n;
      return true;
    }
    const int l = lookup(s);
    if (l < 0) {
      err = "unknown operand " + s;
      return false;
    }
    if (p.local_ty[l - kLocalBase] != ty) {
      err = "local " + s + " has the wrong type";
      return false;
    }
    a.kind = Arg::kReg;
    a.reg = l;
    return true;
  }
  static constexpr int kLocalBase = 1 << 16;  // locals, renumbered after the operands at the end

  // A register or an integer / float immediate.
  bool value(const std::string& s, Arg& a, const char* cons, Ty ty) {
    if (!s.empty() && (std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-')) {
      a.kind = Arg::kImm;
      if (s.size() > 2 && s[0] == '0' && (s[1] == 'f' || s[1] == 'F'))
        a.imm = int64_t(std::strtoull(s.c_str() + 2, nullptr, 16));
      else
        a.imm = std::strtoll(s.c_str(), nullptr, 0);
      return true;
    }
    return reg(s, a, cons, ty);
  }
  bool address(const std::string& s, Arg& a, const char* cons) {
    if (s.size() < 3 || s.front() != '[' || s.back() != ']') {
      err = "expected an address [reg], got " + s;
      return false;
    }
    std::string in = trim(s.substr(1, s.size() - 2));
    int64_t off = 0;
    const size_t plus = in.find('+');
    if (plus != std::string::npos) {
      off = std::strtoll(trim(in.substr(plus + 1)).c_str(), nullptr, 0);
      in = trim(in.substr(0, plus));
    }
    if (!reg(in, a, cons, Ty::kB64)) return false;
    a.kind = Arg::kAddr;
    a.imm = off;
    return true;
  }
  bool vec(const std::string& s, Arg& a, Insn& insn, int n, const char* cons, Ty ty) {
    if (s.size() < 2 || s.front() != '{' || s.back() != '}') {
      err = "expected a vector {...} of " + std::to_string(n) + " registers, got " + s;
      return false;
    }
    const auto parts = split_args(s.substr(1, s.size() - 2));
    if (int(parts.size()) != n) {
      err = "expected " + std::to_string(n) + " registers in " + s + ", got " +
            std::to_string(parts.size());
      return false;
    }
    a.kind = Arg::kVec;
    a.vbegin = int(insn.vregs.size());
    a.vn = n;
    for (const auto& r : parts) {
      Arg x;
      if (!reg(r, x, cons, ty)) return false;
      insn.vregs.push_back(x.reg);
    }
    return true;
  }

  bool nargs(const std::vector<std::string>& args, size_t lo, size_t hi) {
    if (args.size() < lo || args.size() > hi) {
      err = "expected " + std::to_string(lo) + (hi > lo ? "-" + std::to_string(hi) : "") +
            " operands, got " + std::to_string(args.size());
      return false;
    }
    return true;
  }

  void decode(const std::string& opcode, const std::vector<std::string>& args, Insn& insn);
  void declare(const std::string& stmt);
  void statement(const std::string& stmt);
  void parse(const std::string& text);
};

inline void Decoder::decode(const std::string& opcode, const std::vector<std::string>& args,
                            Insn& in) {
  Mods m;
  m.err = &err;
  std::string base;
  {
    size_t s = 0, e;
    bool first = true;
    while ((e = opcode.find('.', s)) != std::string::npos || s <= opcode.size()) {
      if (e == std::string::npos) e = opcode.size();
      const std::string tok = opcode.substr(s, e - s);
      if (first) base = tok;
      else m.t.push_back(tok);
      first = false;
      s = e + 1;
      if (e == opcode.size()) break;
    }
  }
  in.op = opcode;
  if (decode_sm90(*this, base, m, args, in)) return;
  if (base == "add" || base == "sub" || base == "mul" || base == "div" || base == "sqrt") {
    in.a = base == "add" ? 0 : base == "sub" ? 1 : base == "mul" ? 2 : base == "div" ? 3 : 4;
    const int rnd = m.one_of({"rn", "rz", "rm", "rp", "approx", "full"});
    if (rnd > 0) {
      err = "." + m.t[m.i - 1] + " is not emulated (round-to-nearest only)";
      return;
    }
    if (rnd < 0 && (in.a >= 3)) {
      err = base + ".f32 needs a rounding modifier (.rn)";
      return;
    }
    in.b = m.take("ftz");
    if (in.a <= 2) in.c = m.take("sat");
    m.need("f32");
    m.end();
    if (!err.empty() || !nargs(args, in.a == 4 ? 2 : 3, in.a == 4 ? 2 : 3)) return;
    in.args.resize(args.size());
    reg(args[0], in.args[0], "f", Ty::kF32);
    for (size_t i = 1; i < args.size() && err.empty(); ++i) value(args[i], in.args[i], "f", Ty::kF32);
    in.exec = exec_arith;
    in.kind = base == "add" ? "add" : base == "sub" ? "sub" : base == "mul" ? "mul" : base == "div" ? "div" : "sqrt";
  } else if (base == "setp") {
    in.a = m.need_one({"eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu",
                       "geu", "num", "nan"}, "a comparison");
    in.b = m.take("ftz");
    m.need("f32");
    m.end();
    if (!err.empty() || !nargs(args, 3, 3)) return;
    in.args.resize(3);
    reg(args[0], in.args[0], "", Ty::kPred);
    if (err.empty()) value(args[1], in.args[1], "f", Ty::kF32);
    if (err.empty()) value(args[2], in.args[2], "f", Ty::kF32);
    in.exec = exec_setp;
    in.kind = "setp";
  } else if (base == "selp") {
    const int ty = m.need_one({"b32", "u32", "s32", "f32"}, "a 32-bit type");
    m.end();
    if (!err.empty() || !nargs(args, 4, 4)) return;
    const char* cons = ty == 3 ? "f" : "r";
    const Ty t = ty == 3 ? Ty::kF32 : Ty::kB32;
    in.args.resize(4);
    reg(args[0], in.args[0], cons, t);
    if (err.empty()) value(args[1], in.args[1], cons, t);
    if (err.empty()) value(args[2], in.args[2], cons, t);
    if (err.empty()) reg(args[3], in.args[3], "", Ty::kPred);
    in.exec = exec_selp;
    in.kind = "selp";
  } else if (base == "cp" && m.take("async")) {
    if (m.take("commit_group")) {
      m.end();
      in.kind = "cp.async.commit_group";
      if (err.empty() && nargs(args, 0, 0)) in.exec = exec_cp_commit;
      return;
    }
    if (m.take("wait_group")) {
      m.end();
      if (!err.empty() || !nargs(args, 1, 1)) return;
      in.a = 0;
      in.args.resize(1);
      value(args[0], in.args[0], "n", Ty::kImm);
      in.exec = exec_cp_wait;
      in.kind = "cp.async.wait_group";
      return;
    }
    if (m.take("wait_all")) {
      m.end();
      in.a = -1;
      in.kind = "cp.async.wait_all";
      if (err.empty() && nargs(args, 0, 0)) in.exec = exec_cp_wait;
      return;
    }
    const int cg = m.need_one({"ca", "cg"}, ".ca or .cg");
    if (!m.take("shared::cta")) m.need("shared");
    m.need("global");
    m.one_of({"L2::64B", "L2::128B", "L2::256B"});
    m.end();
    if (!err.empty() || !nargs(args, 3, 4)) return;
    in.args.resize(args.size());
    address(args[0], in.args[0], "r");
    if (err.empty()) address(args[1], in.args[1], "l");
    if (err.empty()) value(args[2], in.args[2], "n", Ty::kImm);
    if (err.empty() && in.args[2].kind != Arg::kImm) err = "cp-size must be an immediate";
    if (err.empty() && args.size() == 4) value(args[3], in.args[3], "rn", Ty::kB32);
    if (!err.empty()) return;
    const int64_t size = in.args[2].imm;
    if (cg == 1 ? size != 16 : (size != 4 && size != 8 && size != 16)) {
      err = "cp-size " + std::to_string(size) + " is not allowed (.cg: 16; .ca: 4, 8, 16)";
      return;
    }
    in.exec = exec_cp_async;
    in.kind = "cp.async";
    in.b = cg;
  } else if (base == "ldmatrix") {
    m.need("sync");
    m.need("aligned");
    m.need("m8n8");
    const int x = m.need_one({"x1", "x2", "x4"}, ".x1, .x2 or .x4");
    in.a = x == 0 ? 1 : x == 1 ? 2 : 4;
    in.b = m.take("trans");
    if (!m.take("shared::cta")) m.take("shared");
    m.need("b16");
    m.end();
    if (!err.empty() || !nargs(args, 2, 2)) return;
    in.args.resize(2);
    vec(args[0], in.args[0], in, in.a, "r", Ty::kB32);
    if (err.empty()) address(args[1], in.args[1], "rl");
    in.exec = exec_ldmatrix;
    in.kind = "ldmatrix";
  } else if (base == "mma") {
    m.need("sync");
    m.need("aligned");
    m.need("m16n8k16");
    m.need("row");
    m.need("col");
    m.need("f32");
    const int at = m.need_one({"bf16", "f16"}, ".bf16 or .f16");
    const int bt = m.need_one({"bf16", "f16"}, ".bf16 or .f16");
    m.need("f32");
    m.end();
    if (err.empty() && at != bt) err = "A and B types differ";
    if (!err.empty() || !nargs(args, 4, 4)) return;
    in.a = at;
    in.args.resize(4);
    vec(args[0], in.args[0], in, 4, "f", Ty::kF32);
    if (err.empty()) vec(args[1], in.args[1], in, 4, "r", Ty::kB32);
    if (err.empty()) vec(args[2], in.args[2], in, 2, "r", Ty::kB32);
    if (err.empty()) vec(args[3], in.args[3], in, 4, "f", Ty::kF32);
    in.exec = exec_mma;
    in.kind = "mma.m16n8k16";
  } else {
    err = "instruction " + base + " is not emulated (fastlm_emu_ptx.h)";
  }
}

// `.reg .pred p, q;` / `.reg .b32 r<4>;`
inline void Decoder::declare(const std::string& stmt) {
  std::string rest = trim(stmt.substr(4));
  const size_t sp = rest.find_first_of(" \t\n");
  const std::string ty = rest.substr(0, sp);
  Ty t;
  if (ty == ".pred") t = Ty::kPred;
  else if (ty == ".b16" || ty == ".u16" || ty == ".s16") t = Ty::kB16;
  else if (ty == ".b32" || ty == ".u32" || ty == ".s32") t = Ty::kB32;
  else if (ty == ".b64" || ty == ".u64" || ty == ".s64") t = Ty::kB64;
  else if (ty == ".f32") t = Ty::kF32;
  else if (ty == ".f64") t = Ty::kF64;
  else {
    err = "register type " + ty + " is not emulated";
    return;
  }
  for (const auto& name0 : split_args(rest.substr(sp == std::string::npos ? rest.size() : sp))) {
    std::string name = name0;
    int count = 0;
    const size_t lt = name.find('<');
    if (lt != std::string::npos) {
      count = std::atoi(name.c_str() + lt + 1);
      name = name.substr(0, lt);
    }
    for (int k = 0; k < std::max(count, 1); ++k) {
      const std::string nm = count ? name + std::to_string(k) : name;
      scopes.back().emplace_back(nm, kLocalBase + int(p.local_ty.size()));
      p.local_ty.push_back(t);
      p.local_name.push_back(nm);
    }
  }
}

inline void Decoder::statement(const std::string& s0) {
  std::string s = trim(s0);
  if (s.empty()) return;
  if (s.rfind(".reg", 0) == 0) {
    declare(s);
    return;
  }
  Insn in;
  if (s[0] == '@') {
    size_t e = s.find_first_of(" \t\n");
    std::string g = s.substr(1, e - 1);
    if (!g.empty() && g[0] == '!') {
      in.guard_neg = true;
      g = g.substr(1);
    }
    Arg a;
    if (!reg(g, a, "", Ty::kPred)) return;
    in.guard = a.reg;
    s = trim(s.substr(e));
  }
  const size_t e = s.find_first_of(" \t\n");
  const std::string opcode = s.substr(0, e);
  const auto args = e == std::string::npos ? std::vector<std::string>{}
                                           : split_args(s.substr(e));
  decode(opcode, args, in);
  if (!err.empty()) {
    err = "`" + opcode + "`: " + err;
    return;
  }
  p.insns.push_back(std::move(in));
}

inline void Decoder::parse(const std::string& text) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n && err.empty()) {
    while (i < n && is_space(text[i])) ++i;
    if (i >= n) break;
    if (text[i] == '{') {
      scopes.emplace_back();
      ++i;
      continue;
    }
    if (text[i] == '}') {
      if (scopes.size() == 1) err = "unbalanced }";
      else scopes.pop_back();
      ++i;
      continue;
    }
    int depth = 0;
    size_t j = i;
    for (; j < n; ++j) {
      if (text[j] == '{' || text[j] == '[') ++depth;
      if (text[j] == '}' || text[j] == ']') --depth;
      if (text[j] == ';' && depth == 0) break;
    }
    if (j >= n) {
      err = "statement without ;";
      break;
    }
    statement(text.substr(i, j - i));
    i = j + 1;
  }
  if (err.empty() && scopes.size() != 1) err = "unbalanced {";
}

}  // namespace detail

inline Program::Program(const char* t, const char* w) : text(t), where(w) {
  detail::Decoder d{*this};
  d.parse(text);
  error = d.err;
  // Locals were numbered from kLocalBase; renumber them after the operands.
  const int base = detail::Decoder::kLocalBase;
  auto fix = [&](int& r) {
    if (r >= base) r = nops + (r - base);
  };
  for (Insn& in : insns) {
    fix(in.guard);
    for (Arg& a : in.args) fix(a.reg);
    for (int& r : in.vregs) fix(r);
  }
  wants.resize(nops);
  if (error.empty() && nops + int(local_ty.size()) > kMaxRegs) error = "too many registers";
}

inline void Program::run(std::initializer_list<Opnd> ops) const {
  if (!error.empty()) bad(nullptr, error);
  if (int(ops.size()) < nops)
    bad(nullptr, "the text uses %" + std::to_string(nops - 1) + " but the asm statement has " +
                     std::to_string(ops.size()) + " operands");
  __attribute__((uninitialized)) uint64_t reg[kMaxRegs];  // not pattern-filled: set below
  const Opnd* o = ops.begin();
  if (!checked) {  // a call site's constraints never change: check them once
    for (int i = 0; i < nops; ++i)
      if (!wants[i].empty() && !std::strchr(wants[i].c_str(), o[i].c))
        bad(nullptr, "operand %" + std::to_string(i) + " has constraint \"" + o[i].c +
                         "\", the instruction needs \"" + wants[i] + "\"");
    checked = true;
  }
  for (int i = 0; i < nops; ++i) reg[i] = o[i].dir == '=' ? ~uint64_t(0) : o[i].v;  // outputs: poison
  for (size_t i = 0; i < local_ty.size(); ++i) reg[nops + i] = ~uint64_t(0);
  Ctx c{reg, this, o};
  for (const Insn& in : insns) {
    if (in.guard >= 0 && (reg[in.guard] != 0) == in.guard_neg) continue;
    in.exec(in, c);
  }
  for (int i = 0; i < int(ops.size()); ++i) {
    if (o[i].dir == 'i') continue;
    const uint64_t v = i < nops ? reg[i] : o[i].v;
    switch (o[i].c) {
      case 'h': {
        const uint16_t u = uint16_t(v);
        std::memcpy(o[i].p, &u, 2);
        break;
      }
      case 'l': case 'd': std::memcpy(o[i].p, &v, 8); break;
      default: {
        const uint32_t u = uint32_t(v);
        std::memcpy(o[i].p, &u, 4);
      }
    }
  }
}

}  // namespace ptx
}  // namespace emu

#include "fastlm_emu_sm90.h"
