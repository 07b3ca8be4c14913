"""The GPU check without a GPU: scripts/gpu_run.sh --dry-run runs every stage here (tiny shapes,
the interpreter and the CPU kernels standing in, no rebuild), and scripts/gpu_report.py turns a
results folder -- the dry run's and a synthetic GPU run's -- into the README tables, so that a
broken stage is found by CI and not in the few minutes a GPU is lent.

The dry run's smoke stage collects `pytest -m smoke` over the whole suite; its junit XML is also
what the checks of the smoke subset (tests/smoke.py) read: no rule is stale, every kernel family
is covered per backend, dtype and feature, and the size fits the two-minute budget."""

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import fastlm
from fastlm import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_run.sh")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_report  # noqa: E402
import smoke  # noqa: E402  (tests/smoke.py)

STAGES = ["env", "build", "smoke", "headline", "tests", "sanitize", "large", "bench"]


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # conftest's; the stages set what they need
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _members(results):
    with tarfile.open(os.path.join(results, "results.tar.gz")) as tar:
        return {os.path.basename(m.name): tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("gpu-run"))
    so = glob.glob(os.path.join(ROOT, "fastlm", "_C*.so"))
    before = {p: os.stat(p).st_mtime_ns for p in so}
    t0 = time.time()
    r = _run("--dry-run", results)
    took = time.time() - t0
    after = {p: os.stat(p).st_mtime_ns for p in so}
    return results, r, took, before == after


def test_dry_run_every_stage_passes(dry_run):
    results, r, took, untouched = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = [ln.split("\t") for ln in open(os.path.join(results, "stages.tsv")).read().splitlines()]
    assert rows[0][:4] == ["stage", "status", "exit", "seconds"]
    assert [row[0] for row in rows[1:]] == STAGES
    assert all(row[1] == "pass" for row in rows[1:]), rows
    assert untouched, "the dry run rebuilt fastlm._C"
    print(f"dry run: {took:.0f} s")


def test_dry_run_results_fit_the_device_tool(dry_run):
    # The device tool returns at most 8 files, named in [A-Za-z0-9._-], at most 2 folders down.
    results = dry_run[0]
    names = sorted(os.listdir(results))
    assert names == ["report.md", "results.tar.gz", "run.log", "stages.tsv"], names
    files = _members(results)
    for name in ("env.json", "warm.json", "smoke.xml", "headline-attention.json", "tests.xml",
                 "large.xml", "sanitize-cpu.log", "bench.json", "info.txt", "stages.tsv"):
        assert name in files, f"{name} missing from results.tar.gz: {sorted(files)}"
    env = json.loads(files["env.json"])
    assert env["ceilings"]["copy_gbps"] > 0 and env["versions"]["torch"] == torch.__version__
    from fastlm import bench

    for op in bench.names():  # every op's headline path (the dry run leaves out compiled rows)
        if bench.get(op).shape_list("cpu", "headline"):
            head = json.loads(files[f"headline-{op}.json"])
            assert head["meta"]["profile"] == "headline" and head["results"], op
            assert head["failures"] == 0, (op, head["skipped"])
    smoke = gpu_report.junit_cases(files["smoke.xml"])
    assert len(smoke) >= 200 and all(outcome == "skipped" for _, outcome, _ in smoke)
    warm = json.loads(files["warm.json"])
    assert warm["rows"] and warm["failed"] == 0
    assert b"cases ok" in files["sanitize-cpu.log"]


def test_dry_run_report(dry_run):
    text = open(os.path.join(dry_run[0], "report.md")).read()
    assert text == gpu_report.report([dry_run[0]])
    for heading in ("## Summary", "## The run", "## Correctness", "## Headline benchmarks",
                    "## Default backend per op on CUDA"):
        assert heading in text
    assert "smoke: 0 passed, 0 failed" in text  # every cuda test skipped without a GPU


def test_bad_options(tmp_path):
    r = _run("--stages", "smoke,nope", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "unknown stage 'nope'" in r.stderr
    r = _run("--dry-run", timeout=60)
    assert r.returncode == 2 and "RESULTS folder" in r.stderr
    r = _run("--deadline", "soon", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "--deadline takes seconds" in r.stderr


def test_stage_skipped_when_the_deadline_is_near(tmp_path):
    r = _run("--dry-run", "--stages", "env,headline", "--deadline", "20", str(tmp_path),
             timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = open(tmp_path / "stages.tsv").read().splitlines()[1:]
    assert [ln.split("\t")[:2] for ln in rows] == [["env", "skipped"], ["headline", "skipped"]]


# ---------------------------------------------------------------------------------------------
# The report on a synthetic GPU run.
def _junit(cases):
    body = []
    for nodeid, outcome in cases:
        path, name = nodeid.split("::")
        cls = path[:-3].replace("/", ".")
        inner = {"failed": '<failure message="AssertionError: y: max error 1e-1"/>',
                 "skipped": '<skipped message="skip"/>', "passed": ""}[outcome]
        body.append(f'<testcase classname="{cls}" name="{name}" time="0.1">{inner}</testcase>')
    return ('<?xml version="1.0"?><testsuites><testsuite name="pytest">' + "".join(body)
            + "</testsuite></testsuites>").encode()


def _row(op, direction, shape, backend, ms, **kw):
    return {"op": op, "direction": direction, "shape": shape, "backend": backend,
            "kind": "fastlm" if backend.startswith("fastlm") else "peer", "ms": ms, **kw}


def _headline():
    rows = []
    for d, causal, cudnn, cuda, triton in ((128, False, 600.0, 630.0, 500.0),
                                           (64, True, 450.0, 300.0, 420.0)):
        shape = {"B": 4, "H": 2048 // d, "S": 4096, "D": d, "causal": causal, "dtype": "bfloat16"}
        for name, tf in (("fastlm-cuda", cuda), ("fastlm-triton", triton), ("sdpa-cudnn", cudnn),
                         ("sdpa-flash", 330.0)):
            rows.append(_row("attention", "forward", shape, name, 1.0, tflops=tf))
    ln = {"M": 32768, "N": 4096, "dtype": "bfloat16"}
    for direction, cuda_g, triton_g in (("forward", 3960.0, 3500.0), ("backward", 3400.0, 3700.0)):
        rows.append(_row("layer_norm", direction, ln, "fastlm-cuda", 1.0 / cuda_g, gbps=cuda_g))
        rows.append(_row("layer_norm", direction, ln, "fastlm-triton", 1.0 / triton_g,
                         gbps=triton_g))
        rows.append(_row("layer_norm", direction, ln, "torch", 1.0 / 2000.0, gbps=2000.0))
    adam = {"model": "gpt2-124M", "dtype": "float32"}
    nbytes = 28 * 124_475_904
    rows += [_row("adamw", "step", adam, "fastlm-cuda", 0.84, bytes=nbytes),
             _row("adamw", "step", adam, "fastlm-triton", 0.95, bytes=nbytes),
             _row("adamw", "step", adam, "torch", 0.95, bytes=nbytes),
             _row("adamw", "step+clip", adam, "fastlm-cuda", 0.97, bytes=nbytes),
             _row("adamw", "step+clip", adam, "fastlm-triton", 1.0, bytes=nbytes)]
    gpt = {"model": "gpt2-124M", "B": 32, "T": 1024, "dtype": "bfloat16"}
    rows += [_row("gpt", "step", gpt, "fastlm-compile", 50.0, tokens_s=655360.0, peak_mib=15000),
             _row("gpt", "step", gpt, "torch-compile", 60.0, tokens_s=546133.0, peak_mib=16000),
             _row("gpt", "step", gpt, "torch", 90.0, tokens_s=364089.0, peak_mib=30000)]
    return {"meta": {"device": "NVIDIA H200 (sm_90)", "profile": "headline"},
            "ceilings": {"copy_gbps": 4300.0, "matmul_tflops": 780.0, "matmul": "bf16 8192^3"},
            "results": rows, "skipped": []}


def _folder(path, files, stages):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "stages.tsv"), "w") as f:
        f.write("stage\tstatus\texit\tseconds\texpected_s\tcap_s\n")
        for name, status, sec in stages:
            f.write(f"{name}\t{status}\t0\t{sec}\t90\t240\n")
    with tarfile.open(os.path.join(path, "results.tar.gz"), "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_report_on_a_synthetic_gpu_run(tmp_path):
    smoke_cases = [
        ("tests/test_attention.py::test_forward_backward[cuda-cuda-plain-bfloat16]", "passed"),
        ("tests/test_attention.py::test_forward_backward[triton-cuda-plain-bfloat16]", "passed"),
        ("tests/test_layer_norm.py::test_long_rows[torch.bfloat16-cuda-cuda]", "failed"),
        ("tests/test_layer_norm.py::test_long_rows[torch.bfloat16-triton-cuda]", "passed"),
        ("tests/test_optim.py::test_master_weights[True-torch.bfloat16-cuda-cuda]", "passed"),
        ("tests/test_optim.py::test_master_weights[True-torch.bfloat16-triton-cuda]", "passed"),
    ]
    first = _folder(tmp_path / "call1", {
        "env.json": json.dumps({"device": "NVIDIA H200 (sm_90)", "versions": {
            "torch": "2.11.0", "triton": "3.6.0", "python": "3.12"}}).encode(),
        "smoke.xml": _junit(smoke_cases),
        # one JSON per op, as the headline stage writes them
        **{f"headline-{op}.json": json.dumps(dict(_headline(), results=[
            r for r in _headline()["results"] if r["op"] == op])).encode()
           for op in ("attention", "layer_norm", "adamw", "gpt")},
        "sanitize-memcheck.log": b"========= ERROR SUMMARY: 0 errors\n",
    }, [("env", "pass", 18), ("build", "pass", 190), ("smoke", "fail", 80),
        ("headline", "pass", 170)])
    text = gpu_report.report([first])
    # attention: best fastlm / cuDNN = 630/600 met; 420/450 not met
    assert "| 128 | 4096 | no | forward | 630.0 | 500.0 | 600.0 | 330.0 | 1.05 | met |" in text
    assert "| 64 | 4096 | yes | forward | 300.0 | 420.0 | 450.0 | 330.0 | 0.93 | NOT met |" in text
    # LayerNorm: forward 3960/4300 = 92.1% >= 90% met; backward 3700/4300 = 86.0% >= 85% met
    assert "| 4096 | 32768 | forward | 3,960 | 3,500 | 2,000 | 92.1 | met |" in text
    assert "| 4096 | 32768 | backward | 3,400 | 3,700 | 2,000 | 86.0 | met |" in text
    # AdamW: floor = 28 * 124.5M / 4300 GB/s = 0.811 ms; 0.84 / 0.811 = 1.04 met; clip +15.5%
    assert "| 0.811 | 1.04 | met |" in text
    assert "Clipping fused in: +15.5% over the plain step (goal at most +10%): NOT met." in text
    assert "fastlm compiled / torch.compile: 1.20x tokens/s" in text and "GiB: met." in text
    # correctness: LayerNorm failed on cuda, so its implied default is triton
    assert "- layer_norm: FAILED on cuda" in text
    assert "| layer_norm | cuda > triton > torch | triton > torch |" in text
    assert "| attention | triton > cuda > torch | cuda > triton > torch |" in text
    assert "sanitize-memcheck: ERROR SUMMARY: 0 errors" in text
    assert "attention goal: met at 1 of 2 measured rows" in text

    # A second call that reran the smoke tests with a fix: its results replace the first's.
    fixed = [(n, "passed") for n, _ in smoke_cases]
    second = _folder(tmp_path / "call2", {"smoke.xml": _junit(fixed)}, [("smoke", "pass", 75)])
    text2 = gpu_report.report([first, second])
    assert "- layer_norm: all tests passed" in text2
    assert "| smoke | pass | 75 s | 90 s | 240 s | 2 |" in text2
    assert "| headline | pass | 170 s | 90 s | 240 s | 1 |" in text2
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_report.py"), first,
                        second, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and out.read_text() == text2 == r.stdout


def test_report_reads_the_cuda_order_table():
    assert gpu_report.read_cuda_order() == backends.CUDA_ORDER
    for op, fam_key in gpu_report.OP_FAMILY.items():
        assert fam_key[1] in backends.CUDA_ORDER, op


def test_cuda_order_table_drives_the_default(monkeypatch):
    avail = backends.available()
    avail["cuda"]["cuda"] = avail["triton"]["cuda"] = (True, "")
    monkeypatch.setattr(backends, "_AVAIL", avail)
    dev = torch.device("cuda")  # only its type is read: no GPU needed
    with fastlm.use_backend(None):
        for op, order in backends.CUDA_ORDER.items():
            assert backends.select(op, dev, torch.float32, (torch.float32,)) == order[0], op
        assert backends.select("fastlm.some_new_op", dev, torch.float32, (torch.float32,)) \
            == "cuda"


# ---------------------------------------------------------------------------------------------
# The smoke subset, as the dry run's smoke stage collected it (`pytest -m smoke`).
BACKENDS = ("cuda", "triton")
DTYPES = ("float32", "float16", "bfloat16")
# feature -> (file::function, substring of the parameter id); each needed on both backends.
FEATURES = {
    "bool mask": ("test_attention.py::test_forward_backward", "bool-mask"),
    "float mask": ("test_attention.py::test_forward_backward", "float-mask"),
    "causal": ("test_attention.py::test_forward_backward", "causal"),
    "GQA": ("test_attention.py::test_forward_backward", "gqa"),
    "attention dropout": ("test_attention.py::test_dropout_matches_reference_bits", ""),
    "varlen": ("test_attention_varlen.py::test_varlen_matches_per_sequence_oracle", ""),
    "varlen dropout": ("test_attention_varlen.py::test_varlen_dropout_is_the_padded_problems", ""),
    "fused add+LayerNorm": ("test_add_layer_norm.py::test_forward_backward", "p0.0"),
    "add+LayerNorm dropout": ("test_add_layer_norm.py::test_forward_backward", "p0.3"),
    "LayerNorm long rows": ("test_layer_norm.py::test_long_rows", ""),
    "Adam clipping": ("test_optim.py::test_adam_step_op_grad_scale_and_clip", ""),
    "clip_grad_norm": ("test_optim.py::test_max_grad_norm_equals_clip_grad_norm", ""),
    "Adam master weights": ("test_optim.py::test_master_weights", ""),
    "CUDA graph capture": ("test_optim.py::test_step_captured_in_cuda_graph", ""),
    "attention window + soft-cap": ("test_attention_options.py::test_options_match_oracle",
                                    "softcap-causal-window"),
    "lower-right causal": ("test_attention_options.py::test_options_match_oracle",
                           "causal-lower-right"),
    "attention options + dropout": (
        "test_attention_options.py::test_options_with_dropout_are_the_reference", ""),
    "add+RMSNorm dropout": ("test_rms_norm.py::test_add_forward_backward", "p0.3"),
    "interleaved rotary": ("test_rotary.py::test_forward_backward", "interleaved"),
}
MAX_SMOKE = 500  # the two-minute budget (scripts/gpu_run.sh, EXPECT[smoke]: how it was estimated)


@pytest.fixture(scope="module")
def smoke_ids(dry_run):
    cases = gpu_report.junit_cases(_members(dry_run[0])["smoke.xml"])
    return [nodeid for nodeid, _, _ in cases]


def test_smoke_marker_follows_the_rules(smoke_ids):
    assert smoke_ids and all(smoke.selected_nodeid(n) for n in smoke_ids)
    for key, patterns in smoke.RULES.items():
        pids = [smoke.split_nodeid(n)[1] for n in smoke_ids if smoke.split_nodeid(n)[0] == key]
        for p in patterns:
            assert any(smoke.fnmatch.fnmatchcase(pid, p) for pid in pids), \
                f"smoke rule {key!r} {p!r} matches no cuda test (renamed or removed?)"


def test_smoke_covers_every_family_backend_and_dtype(smoke_ids):
    have = {(smoke.family(n), smoke.backend_of(n), smoke.dtype_of(n)) for n in smoke_ids}
    for fam in ("attention", "varlen_attention", "layer_norm", "add_layer_norm", "rms_norm",
                "rotary", "glu"):
        for backend in BACKENDS + ("torch",):
            for dt in DTYPES:
                assert (fam, backend, dt) in have, f"smoke lacks {fam} on {backend} in {dt}"
    for backend in BACKENDS:
        for dt in ("float16", "bfloat16", None):  # None: float32 parameters (no dtype in the id)
            assert ("adam", backend, dt) in have, f"smoke lacks adam on {backend} ({dt})"
    assert any(smoke.family(n) == "modules" for n in smoke_ids)


def test_smoke_covers_every_feature_on_both_backends(smoke_ids):
    for feature, (key, part) in FEATURES.items():
        for backend in BACKENDS:
            assert any(smoke.split_nodeid(n)[0] == key and part in smoke.split_nodeid(n)[1]
                       and smoke.backend_of(n) == backend for n in smoke_ids), \
                f"smoke lacks {feature} on the {backend} backend"


def test_smoke_size_fits_the_budget(smoke_ids):
    assert 200 <= len(smoke_ids) <= MAX_SMOKE, len(smoke_ids)


def test_test_families_and_backends_from_ids():
    assert smoke.family("tests/test_attention_varlen.py::test_x[a-b]") == "varlen_attention"
    assert smoke.family("tests.test_attention") == "attention"
    assert smoke.family("tests.test_optim.TestSomething") == "adam"
    assert smoke.family("tests.test_unknown") == "other"
    assert smoke.backend_of("tests/test_optim.py::test_g[None-triton]") == "triton"
    assert smoke.backend_of("tests/t.py::f[(8, 4099)-torch.float32-cuda]") == "cuda"
    assert smoke.dtype_of("tests/t.py::f[float16-pfloat32-none-cuda-cuda]") == "float16"
