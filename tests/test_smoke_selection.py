"""The smoke subset of the GPU check (tests/smoke.py): every rule still matches a `cuda` test,
the subset covers every kernel family per backend, dtype and feature, `pytest -m smoke` selects
exactly what the rules say, and its size stays within the two-minute budget."""

import os
import subprocess
import sys

import pytest

import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
}
# Most smoke tests the two-minute budget allows (scripts/gpu_run.sh: how it was estimated).
MAX_SMOKE = 500


def _collect(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [line for line in r.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def cuda_ids():
    return _collect("-m", "cuda", "tests")


@pytest.fixture(scope="module")
def smoke_ids(cuda_ids):
    return [n for n in cuda_ids if smoke.selected_nodeid(n)]


def test_every_rule_matches_cuda_tests(cuda_ids):
    for key, patterns in smoke.RULES.items():
        pids = [smoke.split_nodeid(n)[1] for n in cuda_ids if smoke.split_nodeid(n)[0] == key]
        assert pids, f"smoke rule {key!r}: no such cuda test (renamed or removed?)"
        for p in patterns:
            assert any(smoke.fnmatch.fnmatchcase(pid, p) for pid in pids), \
                f"smoke rule {key!r}: pattern {p!r} matches none of {pids[:5]}..."


def test_every_family_backend_and_dtype(smoke_ids):
    have = {(smoke.family(n), smoke.backend_of(n), smoke.dtype_of(n)) for n in smoke_ids}
    for fam in ("attention", "varlen_attention", "layer_norm", "add_layer_norm"):
        for backend in BACKENDS + ("torch",):
            for dt in DTYPES:
                assert (fam, backend, dt) in have, f"smoke lacks {fam} on {backend} in {dt}"
    for backend in BACKENDS:
        for dt in ("float16", "bfloat16", None):  # None: float32 parameters (no dtype in the id)
            assert ("adam", backend, dt) in have, f"smoke lacks adam on {backend} ({dt})"
    assert any(smoke.family(n) == "modules" for n in smoke_ids)


def test_every_feature_on_both_backends(smoke_ids):
    for feature, (key, part) in FEATURES.items():
        for backend in BACKENDS:
            assert any(smoke.split_nodeid(n)[0] == key and part in smoke.split_nodeid(n)[1]
                       and smoke.backend_of(n) == backend for n in smoke_ids), \
                f"smoke lacks {feature} on the {backend} backend"


def test_size_fits_the_budget(smoke_ids):
    assert 200 <= len(smoke_ids) <= MAX_SMOKE, len(smoke_ids)


def test_marker_is_applied_at_collection(cuda_ids):
    got = _collect("-m", "smoke", "tests/test_optim.py")
    want = [n for n in cuda_ids if n.startswith("tests/test_optim.py::")
            and smoke.selected_nodeid(n)]
    assert got == want and got


def test_family_of_node_ids_and_junit_classnames():
    assert smoke.family("tests/test_attention_varlen.py::test_x[a-b]") == "varlen_attention"
    assert smoke.family("tests.test_attention") == "attention"
    assert smoke.family("tests.test_optim.TestSomething") == "adam"
    assert smoke.family("tests.test_unknown") == "other"
    assert smoke.backend_of("tests/test_optim.py::test_g[None-triton]") == "triton"
    assert smoke.backend_of("tests/t.py::f[(8, 4099)-torch.float32-cuda]") == "cuda"
    assert smoke.dtype_of("tests/t.py::f[float16-pfloat32-none-cuda-cuda]") == "float16"
