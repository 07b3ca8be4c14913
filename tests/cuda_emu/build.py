"""Builds fastlm's CUDA kernels (csrc/cuda) for the CPU emulator of fastlm_emu.h.

The .cu files and the headers beside them are compiled by g++ as they are, after mechanical
rewrites of the source text (nothing a kernel computes changes; README.md in this folder):
  * every inline `asm [volatile] ("ptx" : outputs : inputs : clobbers);` -> a call into
    fastlm_emu_ptx.h's decoder of the same PTX string with the same operands, so the emulator
    runs the instructions the GPU build assembles;
  * every `__global__` function starts with `::emu::kernel_entry(__PRETTY_FUNCTION__, <its
    __launch_bounds__ arguments>);` (names the kernel in messages, checks the block size);
  * `kernel<<<grid, block, smem, stream>>>(args)` -> `::emu::make_launch(kernel, grid, block,
    smem, stream)(args)` (the launch checks of the driver, then the blocks);
  * `extern __shared__ T name[];` -> `T* name = <the block's dynamic shared memory>;` and
    `__shared__ T name[N];` -> `auto& name = ::emu::static_shared<T[N], site>();` (per block,
    guarded and poisoned);
  * `TORCH_LIBRARY_IMPL(fastlm, CUDA, m)` -> `TORCH_LIBRARY_IMPL(fastlm_emu, CPU, m)`, and
    `dev.is_cuda()` (adam.cu's device checks) -> `(dev.is_cuda() || dev.is_cpu())`;
and the op schemas of csrc/fastlm.cpp are registered again as the `fastlm_emu` library.

`load()` builds (once, cached under build/cuda_emu) and returns the ops: `ops.attention_fwd(q,
...)` on CPU tensors runs the CUDA host code and kernels, emulated, with every tensor argument
copied into guarded memory first (and written back when the op mutates it) and every
allocation of the op guarded, so out-of-bounds accesses fault where they happen. Extra ops:
emu_seed(n) (another schedule), emu_set_archs([80, 90]) (the target archs whose limits launches
must meet; default: the build's, fastlm._buildcfg.resolve_archs, or FASTLM_EMU_ARCHS),
emu_ptx_check(text) (decode a PTX string: "" or the error).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SOURCES = ("attention.cu", "layer_norm.cu", "adam.cu", "attention_sm90.cu")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
_IS_CUDA = re.compile(r"\bdev\.is_cuda\(\)")
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")
_STATIC_SMEM = re.compile(r"__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+"
                          r"(\w+)\s*((?:\[[^\]]+\])*)\s*;")
_ASM = re.compile(r"\basm\s*(?:volatile\s*|__volatile__\s*)?\(")
_GLOBAL = re.compile(r"\b__global__\b")


class RewriteError(RuntimeError):
    pass


def _in_comment(text: str, pos: int) -> bool:
    """Whether text[pos] is inside a // comment (the sources use no block comments in code)."""
    line = text[text.rfind("\n", 0, pos) + 1:pos]
    return "//" in line


def _skip_string(text: str, i: int) -> int:
    """Index after the string or char literal starting at text[i]."""
    q = text[i]
    i += 1
    while text[i] != q:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _close(text: str, i: int) -> int:
    """Index of the bracket closing the one at text[i] (strings skipped)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = [pairs[text[i]]]
    i += 1
    while stack:
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if c != stack.pop():
                raise RewriteError(f"unbalanced {c!r} at offset {i}")
        i += 1
    return i - 1


def _split_top(text: str, sep: str) -> list[str]:
    """Splits at `sep` outside strings and brackets."""
    out, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = _skip_string(text, i)
            cur.append(text[i:j])
            i = j
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _operands(part: str, where: str) -> list[tuple[str, str]]:
    ops = []
    for spec in _split_top(part, ","):
        spec = spec.strip()
        if not spec:
            continue
        m = re.fullmatch(r'"([^"]*)"\s*\((.*)\)', spec, re.DOTALL)
        if not m:
            raise RewriteError(f"{where}: cannot read the asm operand {spec!r}")
        ops.append((m.group(1), m.group(2).strip()))
    return ops


def _rewrite_asm(text: str, name: str) -> str:
    out, pos = [], 0
    for m in _ASM.finditer(text):
        if m.start() < pos or _in_comment(text, m.start()):
            continue
        end = _close(text, m.end() - 1)
        line = text.count("\n", 0, m.start()) + 1
        where = f"{name}:{line}"
        parts = _split_top(text[m.end():end], ":")
        tmpl = parts[0].strip()
        if not re.fullmatch(r'("([^"\\]|\\.)*"\s*)+', tmpl):
            raise RewriteError(f"{where}: the asm template must be string literals, got {tmpl!r}")
        args = []
        for cons, expr in _operands(parts[1], where) if len(parts) > 1 else []:
            letter = cons.lstrip("=+&")
            if cons[0] not in "=+" or len(letter) != 1:
                raise RewriteError(f"{where}: unsupported output constraint {cons!r}")
            args.append(f"::emu::ptx::out<'{letter}', '{cons[0]}'>({expr})")
        for cons, expr in _operands(parts[2], where) if len(parts) > 2 else []:
            if len(cons) != 1:
                raise RewriteError(f"{where}: unsupported input constraint {cons!r}")
            args.append(f"::emu::ptx::in<'{cons}'>({expr})")
        out.append(text[pos:m.start()])
        out.append(f'do {{ static const ::emu::ptx::Program _emu_asm({tmpl}, "{where}"); '
                   f'_emu_asm.run({{{", ".join(args)}}}); }} while (0)')
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


def _rewrite_kernels(text: str, name: str) -> str:
    """`__global__ ... __launch_bounds__(B) f(params) {` -> `... f(params) {
    ::emu::kernel_entry(__PRETTY_FUNCTION__, B);`."""
    edits = []  # (start, end, replacement), applied back to front
    for m in _GLOBAL.finditer(text):
        if _in_comment(text, m.start()):
            continue
        i, bounds = m.end(), ""
        while True:
            k = text.index("(", i)
            seg = text[i:k]
            lb = seg.rfind("__launch_bounds__")
            if lb >= 0 and not seg[lb + len("__launch_bounds__"):].strip():
                e = _close(text, k)
                bounds = ", " + text[k + 1:e].strip()
                edits.append((i + lb, e + 1, ""))
                i = e + 1
                continue
            e = _close(text, k)  # the parameter list
            j = e + 1
            while text[j] not in "{;":
                j += 1
            if text[j] == "{":
                edits.append((j + 1, j + 1, f" ::emu::kernel_entry(__PRETTY_FUNCTION__{bounds});"))
            break
    for s, e, r in sorted(edits, reverse=True):
        text = text[:s] + r + text[e:]
    return text


def rewrite(text: str, name: str = "<source>", site0: int = 0) -> tuple[str, int]:
    """The emulator's version of one source file; site0 numbers its static shared arrays."""
    text = _rewrite_asm(text, name)
    text = _rewrite_kernels(text, name)
    text = _LAUNCH.sub(lambda m: f"::emu::make_launch({m.group(1)}, {m.group(2)})(", text)
    text = _EXTERN_SMEM.sub(
        lambda m: (f"{m.group(1)}* {m.group(2)} = "
                   f"reinterpret_cast<{m.group(1)}*>(::emu::dyn_smem());"), text)
    sites = [site0]

    def static(m):
        if _in_comment(text, m.start()):
            return m.group(0)
        sites[0] += 1
        return (f"auto& {m.group(3)} = ::emu::static_shared<{m.group(2)}{m.group(4)}, "
                f"{sites[0]}>();")

    text = _STATIC_SMEM.sub(static, text)
    text = text.replace("TORCH_LIBRARY_IMPL(fastlm, CUDA, m)",
                        "TORCH_LIBRARY_IMPL(fastlm_emu, CPU, m)")
    text = _IS_CUDA.sub("(dev.is_cuda() || dev.is_cpu())", text)
    if "<<<" in text:
        raise RewriteError(f"{name}: a kernel launch was not rewritten")
    return text, sites[0]


def _write(dst: Path, text: str) -> None:
    if not dst.exists() or dst.read_text() != text:  # keep mtimes: ninja rebuilds less
        dst.write_text(text)


def emulated_files(root: Path = ROOT) -> list[Path]:
    """SOURCES and the csrc/cuda headers they include (directly or not)."""
    cuda = root / "csrc" / "cuda"
    todo, seen = [cuda / s for s in SOURCES], []
    while todo:
        path = todo.pop(0)
        if path in seen or not path.exists():
            continue
        seen.append(path)
        todo += [cuda / h for h in re.findall(r'#include "([\w.]+)"', path.read_text())]
    return seen


def generate(out: Path, root: Path = ROOT) -> list[str]:
    """Writes the rewritten sources (and headers, which the .cu files find beside them) into
    `out`; returns the translation units to compile."""
    out.mkdir(parents=True, exist_ok=True)
    cuda = root / "csrc" / "cuda"
    site = 0
    for hdr in emulated_files(root):
        if hdr.suffix != ".cu":
            text, site = rewrite(hdr.read_text(), hdr.name, site)
            _write(out / hdr.name, text)
    files = []
    for src in [cuda / name for name in SOURCES] + [HERE / "probes.cu"]:
        text, site = rewrite(src.read_text(), src.name, site)
        dst = out / (src.stem + "_emu.cpp")
        _write(dst, text)
        files.append(str(dst))
    schemas = (root / "csrc" / "fastlm.cpp").read_text().replace(
        "TORCH_LIBRARY(fastlm, m)", "TORCH_LIBRARY(fastlm_emu, m)")
    dst = out / "schemas_emu.cpp"
    _write(dst, schemas)
    files.append(str(dst))
    files.append(str(HERE / "emu_ops.cpp"))
    return files


def target_archs() -> list[int]:
    """The compute capabilities whose launch limits the emulated launches must meet:
    FASTLM_EMU_ARCHS, else the build's targets (fastlm._buildcfg.resolve_archs)."""
    from fastlm import _buildcfg

    env = dict(os.environ)
    if env.get("FASTLM_EMU_ARCHS"):
        env["FASTLM_CUDA_ARCHS"] = env["FASTLM_EMU_ARCHS"]
    return [int(re.sub(r"\D", "", a)) for a in _buildcfg.resolve_archs(env)]


class GuardedOps:
    """torch.ops.fastlm_emu with every call's tensors in guarded memory (see the module doc)."""

    def __init__(self, ns):
        self._ns = ns

    def __getattr__(self, name):
        import torch

        ns = self._ns
        packet = getattr(ns, name)
        if name.startswith("emu_"):
            return packet
        schema = packet.default._schema
        written = {i for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write}

        def call(*args):
            copies = {}  # original storage pointer -> (original storage, guarded storage)

            def guard(t):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st.data_ptr() not in copies:
                        buf = torch.empty(st.nbytes(), dtype=torch.uint8)
                        buf.untyped_storage().copy_(st)
                        copies[st.data_ptr()] = (st, buf.untyped_storage())
                    g = torch.empty(0, dtype=t.dtype)
                    return g.set_(copies[st.data_ptr()][1], t.storage_offset(), t.size(),
                                  t.stride())
                if isinstance(t, (list, tuple)):
                    return type(t)(guard(x) for x in t)
                return t

            def written_storages(a):
                if isinstance(a, torch.Tensor):
                    return [a.untyped_storage().data_ptr()]
                if isinstance(a, (list, tuple)):
                    return [p for x in a for p in written_storages(x)]
                return []

            with torch.no_grad():
                ns.emu_guard(True)
                try:
                    result = packet(*[guard(a) for a in args])
                finally:
                    ns.emu_guard(False)
                for i in written:
                    if i < len(args):
                        for ptr in written_storages(args[i]):
                            orig, g = copies[ptr]
                            orig.copy_(g)
            return result

        return call


_OPS = None


def load(verbose: bool = False, root: Path = ROOT):
    """Builds (if needed) and loads the emulated CUDA kernels; returns the GuardedOps."""
    global _OPS
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    if _OPS is not None:
        return _OPS
    build = root / "build" / "cuda_emu"
    sources = generate(build / "src", root)
    (build / "obj").mkdir(parents=True, exist_ok=True)
    cpp_load(
        name="fastlm_cuda_emu",
        sources=sources,
        extra_include_paths=[str(build / "src"), str(HERE / "include"), str(root / "csrc" / "cuda"),
                             str(root / "csrc")],
        extra_cflags=["-O1", "-g0", "-DFASTLM_CUDA_EMU", "-Wno-unknown-pragmas",
                      "-Wno-attributes", "-ffp-contract=off", "-ftrivial-auto-var-init=pattern"],
        build_directory=str(build / "obj"),
        is_python_module=False,
        verbose=verbose,
    )
    ns = torch.ops.fastlm_emu
    ns.emu_set_archs(target_archs())
    _OPS = GuardedOps(ns)
    return _OPS


if __name__ == "__main__":
    ops = load(verbose=True)
    print(ops)
