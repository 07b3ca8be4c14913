"""The mutation suite of the CUDA emulator: applies each fault of faults.py to a copy of the
tree, rebuilds the emulator there and runs the emulator tests of the fault's area, which must
fail. Outcomes: killed (a test failed), survived (all passed), crashed (the test process died
by a signal: caught only by luck), timeout, invalid (the fault does not apply or the mutant
does not build). Score = killed / (killed + survived + crashed + timeout).

    python tests/mutation/run.py                 # the working tree's csrc and tests
    python tests/mutation/run.py --commit 0ff7106 --only attn-   # another tree, some faults
    FASTLM_ONDEMAND=1 python -m pytest tests/test_mutation.py    # the whole suite, score 100%

The copy lives in build/mutation/<label> (kept: later runs rebuild only what a fault touches).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from faults import EXTRA, FAULTS, FILES, TESTS  # noqa: E402

COPIED = ("csrc", "tests", "pyproject.toml")


def make_tree(label: str, commit: str | None) -> Path:
    """build/mutation/<label>/src: csrc, tests and pyproject.toml of `commit` (None: the working
    tree), written only where they differ (so the emulator's build there stays incremental)."""
    dst = ROOT / "build" / "mutation" / label / "src"
    files: dict[str, bytes] = {}
    if commit is None:
        for top in COPIED:
            p = ROOT / top
            paths = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
            for q in paths:
                rel = q.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel and not rel.startswith("tests/mutation/"):
                    files[rel] = q.read_bytes()
    else:
        data = subprocess.run(["git", "archive", commit, *COPIED], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    files[m.name] = tar.extractfile(m).read()
    for rel, data in files.items():
        p = dst / rel
        if not p.exists() or p.read_bytes() != data:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    for p in list(dst.rglob("*")):  # files the tree no longer has
        rel = p.relative_to(dst).as_posix()
        if p.is_file() and rel not in files and not rel.startswith("build/") \
                and "__pycache__" not in rel:
            p.unlink()
    return dst


def apply(tree: Path, fault) -> tuple[Path, str] | None:
    """Applies `fault` in tree/csrc/cuda; returns (file, original text) or None."""
    cuda = tree / "csrc" / "cuda"
    hits = [cuda / n for n in FILES if (cuda / n).exists() and fault.old in (cuda / n).read_text()]
    if len(hits) != 1 or hits[0].read_text().count(fault.old) != 1:
        return None
    text = hits[0].read_text()
    hits[0].write_text(text.replace(fault.old, fault.new))
    return hits[0], text


def _env(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "tests") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTLM_ONDEMAND", None)
    return env


def build(tree: Path, timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-c", "from cuda_emu.build import load; load()"]
    try:
        r = subprocess.run(cmd, cwd=tree / "tests", env=_env(tree), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "build timeout"
    return r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def run_tests(tree: Path, area: str, timeout: float) -> tuple[str, str]:
    args = list(TESTS[area])
    if not (tree / args[0]).exists():
        return "invalid", f"{args[0]} missing"
    extra = [e for e in EXTRA if (tree / e).exists()]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-o", "addopts=", *args[:1], *extra, *args[1:]]
    if extra:  # -k applies to every file: let the extra file's tests through
        k = cmd.index("-k")
        cmd[k + 1] = f"({cmd[k + 1]}) or test_cuda_emu_ptx"
    try:
        r = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    out = (r.stdout + r.stderr)[-4000:]
    if r.returncode == 0:
        return "survived", out
    if r.returncode == 1:
        return "killed", out
    if r.returncode < 0 or r.returncode >= 128:
        return "crashed", out
    return "invalid", out  # 2-5: interrupted, internal or usage error, nothing collected


def _first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line[:300]
    for line in reversed(out.splitlines()):
        if "Error" in line:
            return line[:300]
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", help="a git commit to mutate (default: the working tree)")
    ap.add_argument("--label", help="work folder name under build/mutation")
    ap.add_argument("--only", default="", help="faults whose name starts with one of these "
                    "(comma-separated)")
    ap.add_argument("--out", type=Path, help="JSON results file")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per mutant's tests")
    a = ap.parse_args(argv)
    label = a.label or (a.commit or "working")
    tree = make_tree(label, a.commit)
    ok, log = build(tree, 3600)
    if not ok:
        print(f"the unmutated tree does not build:\n{log}", file=sys.stderr)
        return 2
    results = []
    faults = [f for f in FAULTS if f.name.startswith(tuple(a.only.split(",")))]
    for f in faults:
        t0 = time.time()
        applied = apply(tree, f)
        if applied is None:
            outcome, detail = "invalid", "the fault's text is not in csrc/cuda (exactly once)"
        else:
            path, original = applied
            try:
                ok, log = build(tree, 3600)
                if ok:
                    outcome, log = run_tests(tree, f.area, a.timeout)
                    detail = _first_failure(log)
                else:
                    outcome, detail = "invalid", "does not build: " + _first_failure(log)
            finally:
                path.write_text(original)
        r = dict(name=f.name, kind=f.kind, area=f.area, outcome=outcome, detail=detail,
                 seconds=round(time.time() - t0, 1))
        results.append(r)
        print(f"{outcome:9s} {f.name:36s} {r['seconds']:7.1f}s  {detail}", flush=True)
        if a.out:
            a.out.write_text(json.dumps(results, indent=1))
    counted = [r for r in results if r["outcome"] != "invalid"]
    killed = sum(r["outcome"] == "killed" for r in counted)
    print(f"score: {killed}/{len(counted)} killed"
          + "".join(f", {sum(r['outcome'] == o for r in results)} {o}"
                    for o in ("survived", "crashed", "timeout", "invalid")))
    return 0 if counted and killed == len(counted) else 1


if __name__ == "__main__":
    sys.exit(main())
