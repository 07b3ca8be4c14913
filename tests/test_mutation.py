"""The CUDA emulator's mutation suite (tests/mutation): every deliberate fault in csrc/cuda must
make the emulator tests fail, deterministically (a crash of the test process does not count).
Slow (a rebuild and a test run per fault: about an hour on 2 cores), so on demand only:
FASTLM_ONDEMAND=1 python -m pytest tests/test_mutation.py. Scores: benchmarks/NOTES.md."""

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "mutation"))

from faults import FAULTS, FILES  # noqa: E402


def test_faults_cover_every_class():
    kinds = {f.kind for f in FAULTS}
    assert len(FAULTS) >= 25 and len({f.name for f in FAULTS}) == len(FAULTS)
    assert kinds >= {"barrier", "cp.async wait", "mma fragments", "causal comparison",
                     "softmax rescale", "log2e", "shuffle mask", "Adam bias correction",
                     "off-by-one tail", "PTX modifier", "FMA contraction", "smem opt-in",
                     "launch bounds", "out-of-bounds global", "out-of-bounds shared",
                     "uninitialized shared", "inter-block race"}
    assert {f.area for f in FAULTS} == {"attention", "layer_norm", "adam"}


def test_every_fault_applies_to_the_sources_once():
    cuda = HERE.parent / "csrc" / "cuda"
    texts = [(cuda / n).read_text() for n in FILES]
    for f in FAULTS:
        assert sum(t.count(f.old) for t in texts) == 1, f.name


@pytest.mark.ondemand
def test_mutation_score_is_100_percent(tmp_path):
    import run

    out = tmp_path / "mutation.json"
    rc = run.main(["--label", "ondemand", "--out", str(out)])
    results = json.loads(out.read_text())
    missed = [r for r in results if r["outcome"] != "killed"]
    assert rc == 0 and not missed, missed
