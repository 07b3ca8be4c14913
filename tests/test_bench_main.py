"""`fastlm bench`, the README's main command, as a new user runs it (issue 15): it completes
with every case reported; a failing implementation becomes a FAILED line and exit status 1,
never a traceback; the error column compares like with like (dropout rows against the same
bits); every case's full path (every implementation, compiled rows included) runs at tiny
sizes; the pytest-benchmark JSON is readable by pytest-benchmark's own tools.

The two end-to-end tests run the command in a subprocess with a time limit, as the README
gives it (`fastlm bench`), once with --quick (the CI profile of the main command) and once with
--profile tiny (the full path)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm import bench as fb
from fastlm import cli
from fastlm.bench import history, registry, runner

ALL_OPS = fb.names()


def _run_cli(args, tmp_path, timeout):
    """Run `fastlm ARGS` as the console script would, with a private cache dir (the
    duration history), and return (exit status, stdout, stderr)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def _check_complete(report, out, err):
    assert "Traceback" not in out + err
    assert report["failures"] == 0, [s for s in report["skipped"] if s.get("failed")]
    assert "FAILED" not in out
    reported = {r["op"] for r in report["results"]}
    assert reported == set(ALL_OPS), f"cases without results: {set(ALL_OPS) - reported}"
    for r in report["results"]:
        assert r["ms"] > 0
        if r["kind"] == "fastlm" and r["max_err"] is not None:
            # float32 inputs and float64 oracles on the CPU: the kernels agree to rounding.
            assert r["max_err"] < 1e-3, (r["op"], r["direction"], r["backend"], r["errors"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU profile of the main command")
def test_main_command_quick_profile(tmp_path):
    """The README's main command in its short profile: every case, exit 0, within minutes."""
    js = tmp_path / "quick.json"
    rc, out, err = _run_cli(["bench", "--quick", "--no-progress", "--json", str(js)], tmp_path,
                            timeout=600)
    assert rc == 0, out[-3000:] + err[-3000:]
    report = json.loads(js.read_text())
    assert report["meta"]["profile"] == "quick"
    _check_complete(report, out, err)
    assert out.splitlines()[1].startswith("plan: ")  # the duration is announced up front


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the tiny profile")
def test_every_case_full_path_at_tiny_sizes(tmp_path):
    """--profile tiny runs every implementation that `fastlm bench` (full) runs, compiled rows
    included, in every direction: the path that crashed in issue 15 (a compiled backward
    timed with retain_graph)."""
    js, pb, png = tmp_path / "tiny.json", tmp_path / "pb.json", tmp_path / "tiny.png"
    rc, out, err = _run_cli(["bench", "--profile", "tiny", "--no-progress", "--json", str(js),
                             "--pytest-json", str(pb), "--plot", str(png)], tmp_path,
                            timeout=900)
    assert rc == 0, out[-3000:] + err[-3000:]
    report = json.loads(js.read_text())
    _check_complete(report, out, err)
    planned, _ = runner.plan(ALL_OPS, "cpu", "full")
    for case, _shapes, impls, dirs in planned:
        for impl in impls:
            for d in dirs:
                rows = [r for r in report["results"] if r["op"] == case.op and
                        r["backend"] == impl.name and r["direction"] == d]
                assert rows, f"{case.op} {d} {impl.name}: no result in the tiny profile"
    # Dropout rows: fastlm against the oracle with the same bits; torch's rows n/a.
    aln = [r for r in report["results"] if r["op"] == "add_layer_norm"]
    assert any(r["kind"] == "fastlm" and r["max_err"] is not None for r in aln)
    for r in aln:
        if r["backend"].startswith("torch"):
            assert r["max_err"] is None and r["error_na"].startswith("n/a (dropout)")
    assert "max err n/a (dropout)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pytest-benchmark's own tool reads the converted results.
    code = ("import sys; from pytest_benchmark.cli import main; "
            f"sys.argv = ['pytest-benchmark', 'compare', {str(pb)!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = json.loads(pb.read_text())["benchmarks"][0]["name"]
    assert name.split("[")[0] in proc.stdout


# ---------------------------------------------------------------------------------------------
# The runner's behaviour on failures, with a registered toy case.
def _toy_case(op, impls):
    def make_inputs(shape, device):
        return {"x": torch.arange(float(shape["N"]), device=device)}

    def oracle(inputs, direction):
        return (inputs["x"].double() * 2,)

    return registry.Case(op=op, shapes={"cpu": {p: [{"N": 64, "dtype": "float32"}]
                                                for p in registry.PROFILES}},
                         make_inputs=make_inputs, impls=tuple(impls), oracle=oracle,
                         outputs={"forward": ("y",)}, bytes=lambda s, d: 8 * s["N"],
                         directions=("forward",))


@pytest.fixture
def toy_cases(monkeypatch):
    def good(inputs, direction):
        return lambda: (inputs["x"] * 2,)

    def bad_prepare(inputs, direction):
        raise RuntimeError("backend exploded\nsecond line")

    def bad_call(inputs, direction):
        def run():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return run

    monkeypatch.setitem(registry.CASES, "toy", _toy_case("toy", [
        registry.Impl("torch", "torch", good),
        registry.Impl("broken", "peer", bad_prepare, module="torch", install="torch"),
        registry.Impl("oom", "peer", bad_call, module="torch", install="torch"),
        registry.Impl("missing", "peer", good, module="no_such_module_xyz", install="xyz"),
    ]))
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-dir-for-fastlm-tests")
    return registry.CASES


def test_failures_become_lines_and_exit_status_1(toy_cases, capsys):
    assert cli.main(["bench", "toy", "--device", "cpu", "--profile", "tiny",
                     "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED toy broken: forward N=64 float32: RuntimeError: backend exploded" in out
    assert "second line" not in out
    assert "FAILED toy oom: forward N=64 float32: out of memory" in out
    assert "skipped toy missing: not installed (pip install xyz)" in out
    assert "1 results, 1 skipped, 2 failed" in out
    assert "toy forward  N=64 float32" in out  # the working row is still reported


def test_unavailable_is_skipped_not_failed(toy_cases, capsys):
    toy_cases["toy"] = _toy_case("toy", toy_cases["toy"].impls[:1]
                                 + toy_cases["toy"].impls[3:])
    assert cli.main(["bench", "toy", "--device", "cpu", "--profile", "tiny",
                     "--no-progress"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_oracle_failure_fails_the_point_not_the_run(toy_cases, capsys):
    case = toy_cases["toy"]

    def oracle(inputs, direction):
        raise ValueError("no oracle today")

    toy_cases["toy"] = dataclasses.replace(case, oracle=oracle, impls=case.impls[:1])
    report = runner.run(["toy"], "cpu", profile="tiny", progress=False)
    assert report["failures"] == 1 and report["results"] == []
    assert "the oracle failed (ValueError: no oracle today)" in report["skipped"][-1]["reason"]


def test_quick_and_profile_conflict_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", "--profile", "tiny", "--device", "cpu"])
    assert e.value.code == 2
    assert "--quick is --profile quick" in capsys.readouterr().err


def test_every_case_has_every_profile():
    for op in ALL_OPS:
        case = fb.get(op)
        for device in ("cpu", "cuda"):
            for profile in ("full", "quick", "tiny"):
                assert case.shape_list(device, profile), (op, device, profile)
        with pytest.raises(ValueError, match="unknown profile"):
            case.shape_list("cpu", "fast")


def test_headline_profile_is_the_gpu_checks_rows():
    """The GPU check (scripts/gpu_run.sh) times these rows: issue 10's list."""
    att = fb.get("attention").shape_list("cuda", "headline")
    assert {(s["D"], s["S"], s["causal"]) for s in att} == {
        (d, s, c) for d in (64, 128) for s in (4096, 16384) for c in (False, True)}
    assert all(s["B"] * s["S"] == 16384 and s["H"] * s["D"] == 2048 for s in att)
    ln = fb.get("layer_norm").shape_list("cuda", "headline")
    assert [(s["M"], s["N"], s["dtype"]) for s in ln] == [
        (32768, n, "bfloat16") for n in (1024, 4096, 8192)]
    assert fb.get("adamw").shape_list("cuda", "headline") == [
        {"model": "gpt2-124M", "dtype": "float32"}]
    assert fb.get("gpt").shape_list("cuda", "headline")[0]["model"] == "gpt2-124M"
    assert runner.directions(fb.get("attention"), "headline") == ["forward", "backward"]
    assert fb.get("add_layer_norm").shape_list("cuda", "headline")  # row ops share shapes


def test_real_model_shapes_in_full_profile():
    for op in ("layer_norm", "attention"):
        for device in ("cpu", "cuda"):
            models = {s.get("model") for s in fb.get(op).shape_list(device, "full")}
            assert {"gpt2-124M", "llama3-8B"} <= models, (op, device)
    llama = [s for s in fb.get("attention").shape_list("cuda", "full")
             if s.get("model") == "llama3-8B"][0]
    assert llama["H"] == 32 and llama["HKV"] == 8 and llama["D"] == 128
    assert registry.shape_label(llama).startswith("llama3-8B: B=")


def test_bandwidth_ceiling_matches_the_working_set():
    ceilings = {}
    small = fb.timing.bandwidth_ceiling(torch.device("cpu"), 3 << 20, ceilings, budget_s=0.01)
    again = fb.timing.bandwidth_ceiling(torch.device("cpu"), 4 << 20, ceilings, budget_s=0.01)
    assert small is again and small["bytes"] == 4 << 20  # one measurement per power of two
    assert small["gbps"] == max(small["copy_gbps"], small["inplace_gbps"]) > 0
    big = fb.timing.bandwidth_ceiling(torch.device("cpu"), 5 << 20, ceilings, budget_s=0.01)
    assert big["bytes"] == 8 << 20 and set(ceilings["bandwidth"]) == {str(4 << 20), str(8 << 20)}


def test_history_estimates_from_earlier_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    todo = [("layer_norm", "torch")] * 3 + [("gpt", "torch-compile")] * 2
    guess, source = history.estimate(todo, "cpu", "nonexistent-profile")
    assert source == "5 guessed"
    assert guess == 5 * history.GUESS["cpu"] + history.COMPILE_GUESS["cpu"]
    history.record({"layer_norm/torch": [1.0, 1.0, 1.0], "gpt/torch-compile": [31.0, 1.0]},
                   "cpu", "nonexistent-profile")
    total, source = history.estimate(todo, "cpu", "nonexistent-profile")
    assert source == "5 from earlier runs here"
    assert total == pytest.approx(3 * 1.0 + 2 * 1.0 + 30.0)


def test_info_json_and_version(capsys):
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["versions"]["fastlm"] == fastlm.__version__
    assert d["versions"]["torch"] == torch.__version__
    assert set(d["backends"]) == set(fastlm.backends.NAMES)
    assert d["extension"]["loaded"] == (fastlm._ext.C is not None)
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastlm {fastlm.__version__}"


def test_pytest_benchmark_suite_runs_the_same_cases(tmp_path):
    """benchmarks/ (pytest-benchmark) builds its tests from the same registry: with timing
    disabled each point runs once and is checked against the oracle."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(root, "benchmarks", "test_add_layer_norm.py"),
                           "--fastlm-quick", "--fastlm-device", "cpu", "--benchmark-disable",
                           "--rootdir", os.path.join(root, "benchmarks")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_skip_impl_and_partial_json(toy_cases, tmp_path, capsys):
    js = tmp_path / "toy.json"
    assert cli.main(["bench", "toy", "--device", "cpu", "--profile", "tiny", "--no-progress",
                     "--skip-impl", "bro*", "--skip-impl", "oom", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "skipped toy broken: excluded by --skip-impl" in out
    assert "skipped toy oom: excluded by --skip-impl" in out
    report = json.loads(js.read_text())
    assert "partial" not in report["meta"] and len(report["results"]) == 1
    seen = []
    runner.run(["toy"], "cpu", profile="tiny", progress=False, skip_impls=("broken", "oom"),
               on_case=lambda rep: seen.append(rep))
    assert len(seen) == 1 and seen[0]["meta"]["partial"] is True
    assert [r["backend"] for r in seen[0]["results"]] == ["torch"]


def test_fresh_machine_estimate_uses_the_shipped_reference_run(tmp_path, monkeypatch):
    """With no history of its own, a CPU machine's up-front estimate comes from the durations
    shipped with fastlm (fastlm/bench/durations.json, a full run on the 2-core CPU machine), not
    from the per-measurement guess that overestimated the full run 3x (28.5 min for 9.6)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    planned, _ = runner.plan(ALL_OPS, "cpu", "full")
    todo = runner.measurements(planned)
    total, source = history.estimate(todo, "cpu", "full")
    assert source == f"{len(todo)} from a reference run", source
    assert 5 * 60 < total < 20 * 60, total
