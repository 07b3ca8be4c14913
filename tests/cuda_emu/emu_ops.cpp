// The CUDA emulator's own ops (torch.ops.fastlm_emu.emu_*), and the one definition of the fiber
// switch: emu_seed, emu_set_archs / emu_archs, emu_guard (the guarded CPU allocator used while an
// emulated op runs, see fastlm_emu_mem.h) and emu_ptx_check (decode one PTX string).
#define FASTLM_EMU_DEFINE_SWITCH  // this translation unit defines fastlm_emu_switch
#include <fastlm_emu.h>
#include <fastlm_emu_ptx.h>

#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

namespace {

// Every allocation is a guarded mapping (fastlm_emu_mem.h) filled with poison: reads past the
// end fault, writes into the slack are found by the canary check after each launch.
struct GuardedAllocator final : c10::Allocator {
  static void free_region(void* ctx) {
    auto* r = static_cast<emu::Region*>(ctx);
    emu::unmap_region(*r);
    delete r;
  }
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_region, c10::Device(c10::DeviceType::CPU)};
    auto* r = new emu::Region;
    TORCH_CHECK(emu::map_region(*r, n, 64 << 10, 1 << 20, "global allocation"),
                "cuda emulator: cannot map ", n, " bytes");
    std::memset(r->base, emu::kPoison, n);
    return {r->base, r, &free_region, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

GuardedAllocator guarded;
c10::Allocator* previous = nullptr;
int depth = 0;

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_emu, m) {
  // Reseeds the order in which the emulator runs blocks and resumes fibers (default 0x5eed, or
  // FASTLM_EMU_SEED), so a test can run one kernel under several schedules.
  m.def("emu_seed(int seed) -> ()", [](int64_t seed) {
    ::emu::rt().rng.seed(uint64_t(seed));
    ::emu::rt().seeded = true;
  });
  // The target compute capabilities (e.g. [80, 90]): launches must fit each one's limits, and
  // the device reports the smallest one's shared memory per block.
  m.def("emu_set_archs(int[] archs) -> ()", [](c10::IntArrayRef archs) {
    TORCH_CHECK(!archs.empty(), "emu_set_archs: archs must not be empty");
    ::emu::rt().archs.assign(archs.begin(), archs.end());
  });
  m.def("emu_archs() -> int[]", []() {
    const auto& a = ::emu::rt().archs;
    return std::vector<int64_t>(a.begin(), a.end());
  });
  // While on, every CPU allocation is guarded (GuardedAllocator).
  m.def("emu_guard(bool on) -> ()", [](bool on) {
    if (on) {
      if (depth++ == 0) {
        previous = c10::GetCPUAllocator();
        c10::SetCPUAllocator(&guarded, 255);
      }
    } else if (depth > 0 && --depth == 0) {
      c10::SetCPUAllocator(previous, 255);
    }
  });
  // What the decoder makes of a PTX text: one "kind a b c d" line per instruction (the
  // attributes' meaning per kind: fastlm_emu_ptx.h), or "error: <message>".
  m.def("emu_ptx_decode(str text) -> str[]", [](std::string text) {
    ::emu::ptx::Program p(text.c_str(), "emu_ptx_decode");
    std::vector<std::string> out;
    if (!p.error.empty()) return std::vector<std::string>{"error: " + p.error};
    for (const auto& in : p.insns)
      out.push_back(std::string(in.kind) + " " + std::to_string(in.a) + " " +
                    std::to_string(in.b) + " " + std::to_string(in.c) + " " + std::to_string(in.d));
    return out;
  });
  // "" if the PTX text decodes, else the decoder's message.
  m.def("emu_ptx_check(str text) -> str", [](std::string text) {
    ::emu::ptx::Program p(text.c_str(), "emu_ptx_check");
    return p.error;
  });
}
