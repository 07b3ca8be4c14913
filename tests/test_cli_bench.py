"""The `fastlm` command on the CPU: `info`, a quick `bench` with its JSON and PNG, argument
errors, the `compile` hand-off, and that importing fastlm leaves the heavy modules alone."""

import json
import math
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm import backends, cli

# (triton.testing is left out: `import triton` imports it itself.)
HEAVY = ("rich", "matplotlib", "liger_kernel")


def test_info_reports_versions_build_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastlm  {fastlm.__version__}" in out
    assert f"torch   {torch.__version__}" in out
    assert "fastlm._C:" in out
    assert "backends" in out
    for name in backends.NAMES:
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    if fastlm._ext.C is None:
        assert fastlm._ext.ERROR in out


def test_bench_cpu_quick_writes_json_and_png(tmp_path, capsys):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "layer_norm", "--device", "cpu", "--quick",
                     "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "layer_norm forward  M=4096 N=1024 float32" in out
    assert "layer_norm backward  M=4096 N=1024 float32" in out
    assert "skipped layer_norm fastlm-triton" in out

    report = json.loads(js.read_text())
    assert set(report) == {"meta", "ceilings", "skipped", "results", "failures"}
    assert report["failures"] == 0
    meta = report["meta"]
    for key in ("device", "torch", "triton", "python", "fastlm", "git_commit", "date",
                "cuda_archs"):
        assert key in meta
    assert meta["device_type"] == "cpu" and meta["quick"] is True and meta["profile"] == "quick"
    assert meta["fastlm"] == fastlm.__version__ and meta["torch"] == torch.__version__
    assert report["ceilings"]["copy_gbps"] > 0 and report["ceilings"]["matmul_tflops"] > 0

    results = report["results"]
    expected = {"torch"} | ({"fastlm-cpu"} if backends.available()["cpu"]["cpu"][0] else set())
    for direction in ("forward", "backward", "forward+backward"):
        rows = {r["backend"]: r for r in results if r["direction"] == direction}
        assert set(rows) == expected
        assert rows["torch"]["x_torch"] == 1.0
        for r in rows.values():
            assert r["shape"] == {"M": 4096, "N": 1024, "dtype": "float32"}
            assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0 and r["x_torch"] > 0
            per_elem = {"forward": 2, "backward": 3, "forward+backward": 5}[direction] * 4
            assert r["bytes"] == 4096 * 1024 * per_elem
            assert math.isclose(r["gbps"], r["bytes"] / r["ms"] / 1e6)
            assert r["max_err"] == max(r["errors"].values())
    fwd_err = {r["backend"]: r["max_err"] for r in results if r["direction"] == "forward"}
    assert all(err < 1e-4 for err in fwd_err.values()), fwd_err
    bwd = [r for r in results if r["direction"] == "backward"]
    assert all(set(r["errors"]) == {"dx", "dw", "db"} for r in bwd)
    skipped = {s["backend"] for s in report["skipped"]}
    assert {"fastlm-cuda", "fastlm-triton", "liger", "torch-compile"} <= skipped

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unknown_op_exits_2_naming_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "layer_nrom", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "layer_nrom" in err and "layer_norm" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_unavailable_device_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cuda"])
    assert e.value.code == 2
    assert "cuda is not available" in capsys.readouterr().err


def test_compile_is_handed_to_fastlm_compile(monkeypatch):
    import fastlm.compile

    seen = []
    monkeypatch.setattr(fastlm.compile, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["compile", "--arch", "sm_90", "--no-triton"]) == 7
    assert seen == [["--arch", "sm_90", "--no-triton"]]


def test_import_stays_light():
    code = ("import sys, fastlm, fastlm.cli, fastlm.bench; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
