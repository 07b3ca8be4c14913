"""Builds fastlm's CUDA kernels (csrc/cuda/*.cu) for the CPU emulator of fastlm_emu.h.

The .cu files are compiled by g++ as they are, with three mechanical rewrites of the source
text (nothing in the kernels' bodies changes):
  * `kernel<<<grid, block, smem, stream>>>(args)` -> `::emu::make_launch(kernel, grid, block,
    smem, stream)(args)`;
  * `extern __shared__ T name[];` -> `T* name = reinterpret_cast<T*>(::emu::dyn_smem());`;
  * `TORCH_LIBRARY_IMPL(fastlm, CUDA, m)` -> `TORCH_LIBRARY_IMPL(fastlm_emu, CPU, m)`;
  * `dev.is_cuda()` (adam.cu's checks that the tensors are on a GPU) -> `(dev.is_cuda() ||
    dev.is_cpu())`: the emulated device's memory is the CPU's;
and the op schemas of csrc/fastlm.cpp are registered again as the `fastlm_emu` library. So
`torch.ops.fastlm_emu.attention_fwd(q, ...)` on CPU tensors runs the CUDA host code and the CUDA
kernels, emulated; `torch.ops.fastlm_emu.emu_seed(n)` picks another fiber schedule. The
inline-asm PTX wrappers of attention.cu (and adam.cu's IEEE float ops) are swapped for the
emulator's under FASTLM_CUDA_EMU.

Usage: `load()` builds (once, cached under build/cuda_emu) and imports the library.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SOURCES = ("attention.cu", "layer_norm.cu", "adam.cu")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
_IS_CUDA = re.compile(r"\bdev\.is_cuda\(\)")
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")


# emu_seed(seed): reseeds the order in which the emulator resumes its fibers (default 0x5eed, or
# FASTLM_EMU_SEED), so a test can run one kernel under several schedules.
_SEED_OP = """
#define FASTLM_EMU_DEFINE_SWITCH  // this translation unit defines fastlm_emu_switch
#include <fastlm_emu.h>
TORCH_LIBRARY_FRAGMENT(fastlm_emu, m) {
  m.def("emu_seed(int seed) -> ()", [](int64_t seed) {
    ::emu::rt().rng.seed(uint64_t(seed));
    ::emu::rt().seeded = true;
  });
}
"""


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(lambda m: f"::emu::make_launch({m.group(1)}, {m.group(2)})(", text)
    text = _EXTERN_SMEM.sub(
        lambda m: (f"{m.group(1)}* {m.group(2)} = "
                   f"reinterpret_cast<{m.group(1)}*>(::emu::dyn_smem());"), text)
    text = text.replace("TORCH_LIBRARY_IMPL(fastlm, CUDA, m)",
                        "TORCH_LIBRARY_IMPL(fastlm_emu, CPU, m)")
    text = _IS_CUDA.sub("(dev.is_cuda() || dev.is_cpu())", text)
    if "<<<" in text:
        raise RuntimeError("a kernel launch was not rewritten")
    return text


def generate(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in SOURCES:
        src = (ROOT / "csrc" / "cuda" / name).read_text()
        dst = out / (name[:-3] + "_emu.cpp")
        text = rewrite(src)
        if not dst.exists() or dst.read_text() != text:  # keep mtimes: ninja rebuilds less
            dst.write_text(text)
        files.append(str(dst))
    schemas = (ROOT / "csrc" / "fastlm.cpp").read_text().replace(
        "TORCH_LIBRARY(fastlm, m)", "TORCH_LIBRARY(fastlm_emu, m)") + _SEED_OP
    dst = out / "schemas_emu.cpp"
    if not dst.exists() or dst.read_text() != schemas:
        dst.write_text(schemas)
    files.append(str(dst))
    return files


def load(verbose: bool = False):
    """Builds (if needed) and loads the emulated CUDA kernels; returns torch.ops.fastlm_emu."""
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    if hasattr(torch.ops, "fastlm_emu") and hasattr(torch.ops.fastlm_emu, "attention_fwd"):
        return torch.ops.fastlm_emu
    build = ROOT / "build" / "cuda_emu"
    sources = generate(build / "src")
    (build / "obj").mkdir(parents=True, exist_ok=True)
    cpp_load(
        name="fastlm_cuda_emu",
        sources=sources,
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc" / "cuda"),
                             str(ROOT / "csrc")],
        extra_cflags=["-O1", "-g0", "-DFASTLM_CUDA_EMU", "-Wno-unknown-pragmas",
                      "-Wno-attributes", "-ffp-contract=off"],
        build_directory=str(build / "obj"),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.fastlm_emu


if __name__ == "__main__":
    ops = load(verbose=True)
    print(ops)
