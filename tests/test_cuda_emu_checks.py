"""The CUDA emulator's own checks (tests/cuda_emu): each one fails a launch deterministically,
naming the kernel, the block, the thread and the address, without crashing the process.

The faults are small kernels of tests/cuda_emu/probes.cu (compiled into the emulator beside the
real ones); the real kernels' faults are the mutation suite's business (tests/mutation).
"""

import re
from pathlib import Path

import pytest
import torch
from cuda_emu.build import emulated_files, load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emu():
    ops = load()
    archs = ops.emu_archs()
    yield ops
    ops.emu_set_archs(archs)


# ---------------------------------------------------------------------------------------------
# Global memory.
def test_global_write_past_the_end_fails_naming_kernel_thread_and_address(emu):
    out = torch.zeros(64)
    emu.probe_store(out, 64, 128)  # in bounds: fine
    assert torch.equal(out, torch.arange(64.0))
    with pytest.raises(RuntimeError) as e:
        emu.probe_store(torch.zeros(64), 65, 128)
    msg = str(e.value)
    assert "probe_store" in msg and "block (0,0,0) thread (64,0,0)" in msg
    assert re.search(r"invalid write at address 0x[0-9a-f]+, 0 bytes past the end of the global "
                     r"allocation of 256 bytes", msg), msg


def test_global_read_past_the_end_fails(emu):
    x = torch.randn(40)
    assert torch.equal(emu.probe_copy(x, 40), x)
    with pytest.raises(RuntimeError, match=r"probe_copy.*thread \(4[0-7],0,0\): invalid read at "
                                           r"address 0x[0-9a-f]+, \d+ bytes past the end of the "
                                           r"global allocation of 160 bytes"):
        emu.probe_copy(x, 48)  # 160 bytes round up to 160: the first read past them faults


def test_unwritten_output_is_poison(emu):
    """Fresh allocations are NaN: elements a kernel forgets to write show."""
    out = emu.probe_copy(torch.ones(8), 5)
    assert torch.equal(out[:5], torch.ones(5)) and torch.isnan(out[5:]).all()
    out = torch.ones(16)
    emu.probe_store(out, 8, 32)  # an argument keeps its values where the kernel does not write
    assert torch.equal(out, torch.cat([torch.arange(8.0), torch.ones(8)]))


def test_global_write_into_the_slack_fails_after_the_launch(emu):
    """A float past a 10-float tensor lands in the < 16 bytes before the page end: the canary."""
    with pytest.raises(RuntimeError, match=r"probe_store\(float\*, int\) wrote outside a global allocation: "
                                           r"address 0x[0-9a-f]+, 0 bytes past the end of the "
                                           r"global allocation of 40 bytes"):
        emu.probe_store(torch.zeros(10), 11, 32)


def test_cp_async_source_past_the_end_fails_at_the_instruction(emu):
    with pytest.raises(RuntimeError, match=r"probe_cp_async_oob.*thread \(0,0,0\): invalid read "
                                           r"at address 0x[0-9a-f]+, 0 bytes past the end of the "
                                           r"global allocation of 64 bytes"):
        emu.probe_cp_async_oob(torch.zeros(16))


# ---------------------------------------------------------------------------------------------
# Shared memory.
def test_dynamic_shared_memory_past_either_end_fails(emu):
    out = torch.zeros(1)
    emu.probe_dyn_smem(out, 4096, 1023, -1)
    assert out.item() == 1.0
    with pytest.raises(RuntimeError, match=r"probe_dyn_smem.*thread \(0,0,0\): invalid write at "
                                           r"address 0x[0-9a-f]+, 0 bytes past the end of the "
                                           r"dynamic shared memory of 4096 bytes"):
        emu.probe_dyn_smem(torch.zeros(1), 4096, 1024, -1)
    with pytest.raises(RuntimeError, match=r"thread \(0,0,0\): invalid write at address "
                                           r"0x[0-9a-f]+, 4 bytes before the start of the "
                                           r"dynamic shared memory"):
        emu.probe_dyn_smem(torch.zeros(1), 4096, -1, -1)


def test_dynamic_shared_memory_slack_write_fails_after_the_block(emu):
    """4100 bytes: the float at byte 4100 is in the 12 bytes of slack before the page end, the
    float before the start in the slack after the page start; the canary finds both."""
    with pytest.raises(RuntimeError, match=r"probe_dyn_smem.*: block \(0,0,0\) wrote outside its "
                                           r"dynamic shared memory: address 0x[0-9a-f]+, 0 bytes "
                                           r"past the end"):
        emu.probe_dyn_smem(torch.zeros(1), 4100, 1025, -1)
    with pytest.raises(RuntimeError, match=r"wrote outside its dynamic shared memory: .* 4 bytes "
                                           r"before the start"):
        emu.probe_dyn_smem(torch.zeros(1), 4100, -1, -1)


def test_static_shared_memory_is_poison_in_every_block(emu):
    out = emu.probe_static_smem(6).view(6, -1)
    assert (out[0] == 1).all()
    assert torch.isnan(out[1:]).all(), "another block saw block 0's static shared values"


def test_static_shared_array_keeps_its_place_when_more_slots_map_it(emu):
    """Regression: the per-slot copies of a static array lived in a vector, so the launch that
    first used slot 1 moved slot 0's copy while the emulator's registry of guarded regions still
    pointed at the old one; a later launch then read freed memory (CI died of a segfault in
    check_global_canaries, depending on the schedule). One block, then many, then many again:
    every launch runs, and the block reads the values its own threads wrote."""
    for blocks in (1, 6, 6, 1):
        out = emu.probe_static_slots(blocks).view(blocks, -1)
        assert torch.equal(out, torch.arange(blocks, dtype=torch.float32)[:, None].expand_as(out))
    assert emu.probe_static_oob(15).item() == 2.0


def test_static_shared_array_out_of_bounds_fails(emu):
    assert emu.probe_static_oob(15).item() == 2.0
    with pytest.raises(RuntimeError, match=r"probe_static_oob.*thread \(0,0,0\): invalid write at "
                                           r"address 0x[0-9a-f]+, 0 bytes past the end of the "
                                           r"static __shared__ array of 64 bytes"):
        emu.probe_static_oob(16)
    with pytest.raises(RuntimeError, match=r"probe_static_oob.*: block \(0,0,0\) wrote outside a "
                                           r"static shared array: address 0x[0-9a-f]+, 4 bytes "
                                           r"before the start of the static __shared__ array"):
        emu.probe_static_oob(-1)


def test_registers_start_as_poison(emu):
    out = emu.probe_registers()
    assert (out == int(0xFEFEFEFE - (1 << 32))).all(), out


# ---------------------------------------------------------------------------------------------
# Launch checks.
def test_dynamic_shared_memory_above_48k_needs_the_opt_in(emu):
    out = torch.zeros(1)
    emu.probe_dyn_smem(out, 48 * 1024, 0, 0)  # up to 48 KB: no opt-in needed
    with pytest.raises(RuntimeError, match=r"launch of void probes::probe_dyn_smem\(float\*, "
                                           r"[^)]*\) with grid \(1,1,1\), block \(32,1,1\) "
                                           r"failed: too many resources requested: 65536 bytes of "
                                           r"dynamic shared memory need cudaFuncSetAttribute"):
        emu.probe_dyn_smem(out, 64 * 1024, 0, 0)
    with pytest.raises(RuntimeError, match=r"the kernel's opt-in is 61440"):
        emu.probe_dyn_smem(out, 64 * 1024, 0, 60 * 1024)
    emu.probe_dyn_smem(out, 64 * 1024, 0, 64 * 1024)  # opted in
    assert out.item() == 1.0
    with pytest.raises(RuntimeError, match=r"the kernel's opt-in is 0"):
        emu.probe_dyn_smem(out, 64 * 1024, 0, 0)  # opt-in set back to 0


def test_shared_memory_per_block_of_every_target_arch(emu):
    out = torch.zeros(1)
    emu.emu_set_archs([80, 90])
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute\(200000\) failed"):
        emu.probe_dyn_smem(out, 200_000, 0, 200_000)  # above sm_80's 163 KB
    emu.emu_set_archs([90])
    emu.probe_dyn_smem(out, 200_000, 0, 200_000)  # sm_90 alone: 227 KB
    emu.emu_set_archs([90, 86])
    with pytest.raises(RuntimeError, match=r"110000 bytes of dynamic shared memory exceed the "
                                           r"101376 bytes per block of sm_90, sm_86"):
        emu.probe_dyn_smem(out, 110_000, 0, -1)
    emu.emu_set_archs([80, 90])


def test_block_size_against_launch_bounds_and_1024(emu):
    with pytest.raises(RuntimeError, match=r"probe_store.*a block of 256 threads exceeds the "
                                           r"kernel's __launch_bounds__\(128\)"):
        emu.probe_store(torch.zeros(8), 8, 256)
    with pytest.raises(RuntimeError, match=r"launch of void probes::probe_store\(float\*, int\) "
                                           r"with grid \(1,1,1\), block \(2048,1,1\) failed: invalid "
                                           r"configuration"):
        emu.probe_store(torch.zeros(8), 8, 2048)


# ---------------------------------------------------------------------------------------------
# Block order.
def test_blocks_run_in_a_seeded_random_order_two_at_a_time(emu):
    logs = []
    for seed in (1, 2, 3, 1):
        emu.emu_seed(seed)
        log = emu.probe_order(8)
        assert log[0] == 16
        logs.append(log[1:].tolist())
    assert logs[0] == logs[3], "the same seed gives the same schedule"
    assert len({tuple(x) for x in logs}) == 3
    for log in logs:
        assert sorted(log) == sorted(list(range(8)) * 2)
    firsts = [[b for i, b in enumerate(log) if b not in log[:i]] for log in logs]
    assert any(f != list(range(8)) for f in firsts), "blocks start in index order"
    # Two blocks are resident at once: some block starts before the previous one has finished.
    interleaved = [any(log[i] != log[i + 1] for i in range(0, 16, 2)) for log in logs]
    assert any(interleaved), logs


# ---------------------------------------------------------------------------------------------
# PTX decoding: the kernels' own strings decode; wrong modifiers fail.
def _asm_strings():
    out = []
    for path in emulated_files():
        text = path.read_text()
        for m in re.finditer(r'\basm\s*(?:volatile\s*)?\(((?:\s*"(?:[^"\\]|\\.)*")+)', text):
            parts = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1))
            out.append(bytes("".join(parts), "utf-8").decode("unicode_escape"))
    return out


def test_every_ptx_string_of_the_kernels_decodes(emu):
    strings = _asm_strings()
    assert len(strings) >= 13
    bad = {s: emu.emu_ptx_check(s) for s in strings if emu.emu_ptx_check(s)}
    assert not bad, bad


@pytest.mark.parametrize("text,error", [
    ("ldmatrix.sync.aligned.m8n8.x4.trnas.shared.b16 {%0, %1, %2, %3}, [%4];",
     "unknown or misplaced modifier .trnas"),
    ("ldmatrix.sync.aligned.m8n8.x4.shared.trans.b16 {%0, %1, %2, %3}, [%4];",
     "unknown or misplaced modifier .trans (expected .b16)"),
    ("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2}, [%3];", "expected 4 registers"),
    ("ldmatrix.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];",
     "modifier .aligned (expected .sync)"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
     "{%8, %9}, {%0, %1, %2, %3};", "A and B types differ"),
    ("mma.sync.aligned.m16n8k16.col.row.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
     "{%8, %9}, {%0, %1, %2, %3};", "misplaced modifier .col (expected .row)"),
    ("cp.async.cg.shared.global [%0], [%1], 8, %2;", "cp-size 8 is not allowed"),
    ("cp.async.cg.global.shared [%0], [%1], 16, %2;", "modifier .global (expected .shared)"),
    ("cp.async.wait_groups 1;", "unknown or misplaced modifier .wait_groups"),
    ("mul.rz.f32 %0, %1, %2;", ".rz is not emulated"),
    ("div.f32 %0, %1, %2;", "needs a rounding modifier"),
    ("mul.rn.f64 %0, %1, %2;", "modifier .f64 (expected .f32)"),
    ("fma.rn.f32 %0, %1, %2, %3;", "instruction fma is not emulated"),
    ("{ .reg .pred p; setp.lt.f32 q, %1, %2; selp.u32 %0, 1, 0, p; }", "unknown operand q"),
])
def test_wrong_ptx_is_rejected(emu, text, error):
    assert error in emu.emu_ptx_check(text)


def test_a_wrong_ptx_string_fails_the_launch_naming_the_site(emu):
    with pytest.raises(RuntimeError, match=r"probe_bad_ptx.*thread \(\d+,0,0\): PTX `mul\.rnn\.f32 "
                                           r"%0, %1, %2;` \(probes\.cu:\d+\): `mul\.rnn\.f32`: "
                                           r"unknown or misplaced modifier \.rnn"):
        emu.probe_bad_ptx()
