"""Turn the results of scripts/gpu_run.sh into the README's GPU tables and a short summary.

    python3 scripts/gpu_report.py RESULTS [RESULTS2 ...] [--out report.md]

RESULTS is a folder written by gpu_run.sh (stages.tsv, results.tar.gz) or an unpacked copy of
its stage files. With several folders (a first call and a second one with fixes), a later
folder's files replace an earlier one's, stage by stage. The report holds:

  - the run: device, versions, commit, ceilings measured at the start, stage times against the
    expected ones;
  - correctness: pass/fail/skip per kernel family and backend, from the junit XML of the smoke,
    tests and large stages, with the failing tests named; the sanitizer's error summaries;
  - the headline tables (attention, LayerNorm, AdamW, GPT-2 step), each ratio set against its
    goal from ../shared/ANCHORS.md and marked met or not met;
  - the default backend per op on CUDA that these numbers imply (correct first, then fastest),
    beside today's table (fastlm/backends.py, CUDA_ORDER).

Numbers reach the README only through this report, never copied by hand. It imports neither
torch nor fastlm (it runs after every stage of a time-boxed run).
"""

import argparse
import ast
import json
import math
import os
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import smoke  # noqa: E402  (tests/smoke.py: kernel family of a test, its backend and dtype)

# Goals (../shared/ANCHORS.md, "Goals"): ratios measured in the same run.
GOALS = {
    "attention": "fastlm >= SDPA-cuDNN TFLOP/s at every row, forward and backward",
    "layer_norm": "forward >= 90% and backward >= 85% of the copy bandwidth measured at the start",
    "adamw": "within 1.08x of the 28 bytes/parameter floor at the measured copy bandwidth; "
             "clipping fused in for at most 10% more",
    "gpt": "fastlm compiled >= 1.1x torch.compile tokens/s, peak memory no higher",
}
LN_FWD_GOAL, LN_BWD_GOAL = 0.90, 0.85
ADAM_FLOOR_GOAL, ADAM_CLIP_GOAL = 1.08, 1.10
GPT_GOAL = 1.1
JUNIT_STAGES = ("smoke", "tests", "large")
BACKENDS = ("cuda", "triton", "torch")
# benchmark op -> (test family, its key in fastlm/backends.py CUDA_ORDER): a kernel that failed
# its tests is never a default
OP_FAMILY = {"attention": ("attention", "fastlm.scaled_dot_product_attention"),
             "layer_norm": ("layer_norm", "fastlm.layer_norm"),
             "add_layer_norm": ("add_layer_norm", "fastlm.add_layer_norm"),
             "adamw": ("adam", "fastlm.adam_step_")}


# ---------------------------------------------------------------------------------------------
# Reading a results folder.
def read_folder(path):
    """{file name: bytes} of one results folder (its tarball and loose files)."""
    files = {}
    tgz = os.path.join(path, "results.tar.gz")
    if os.path.isfile(tgz):
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    files[os.path.basename(m.name)] = tar.extractfile(m).read()
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full) and name not in ("results.tar.gz", "report.md"):
            with open(full, "rb") as f:
                files[name] = f.read()
    return files


def read_stages(text):
    rows = []
    for line in text.decode().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 6:
            rows.append(dict(zip(("stage", "status", "exit", "seconds", "expected_s", "cap_s"),
                                 parts)))
    return rows


def merge(folders):
    """Files and stage rows of several results folders, later ones winning per stage."""
    files, stages = {}, {}
    for i, path in enumerate(folders):
        got = read_folder(path)
        rows = read_stages(got.get("stages.tsv", b"stage\n"))
        for r in rows:
            r["run"] = i + 1
            stages[r["stage"]] = r
            if r["status"] != "skipped":  # drop the stage's older files
                for name in [n for n in files if n.startswith(r["stage"])]:
                    del files[name]
        files.update({k: v for k, v in got.items() if k != "stages.tsv"})
    return files, [stages[s] for s in stages]


def junit_cases(data):
    """[(nodeid, outcome, message)] of a junit XML file; outcome passed/failed/skipped."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    out = []
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        path = "tests/" + cls.split(".")[-1] + ".py" if cls else "?"
        nodeid = f"{path}::{name}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                outcome, msg = "failed", (el.get("message") or "")[:200]
        if outcome == "passed" and case.find("skipped") is not None:
            outcome, msg = "skipped", (case.find("skipped").get("message") or "")[:120]
        out.append((nodeid, outcome, msg))
    return out


# ---------------------------------------------------------------------------------------------
# Formatting.
def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{nd}f}"


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "NOT met")


# ---------------------------------------------------------------------------------------------
# Sections.
def section_run(files, stages):
    out = ["## The run"]
    env = json.loads(files["env.json"]) if "env.json" in files else {}
    names = headline_files(files)
    head = json.loads(files[names[0]]) if names else {}
    meta = head.get("meta", {})
    v = env.get("versions", meta)
    dev = env.get("device") or meta.get("device") or "unknown device"
    smi = env.get("nvidia_smi", {})
    commit = (env.get("git_commit") or meta.get("git_commit") or "?")[:10]
    out.append(f"{dev}; torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, python "
               f"{v.get('python', '?')}; commit {commit}"
               + (f"; driver {smi['driver_version']}, SM clock {smi.get('clocks.sm')} "
                  f"(max {smi.get('clocks.max.sm')})" if smi.get("driver_version") else ""))
    c = ceilings(files)
    if c:
        out.append(f"Ceilings measured at the start: copy {fmt(c.get('copy_gbps'), 0)} GB/s "
                   f"(bytes read + written), matmul {fmt(c.get('matmul_tflops'))} TFLOP/s "
                   f"({c.get('matmul', '?')}).")
    if stages:
        rows = [[s["stage"], s["status"], s["seconds"] + " s", s["expected_s"] + " s",
                 s["cap_s"] + " s", s.get("run", 1)] for s in stages]
        out.append(table(["stage", "status", "took", "expected (H200)", "timeout", "call"], rows))
        total = sum(int(s["seconds"] or 0) for s in stages)
        core = sum(int(s["seconds"] or 0) for s in stages
                   if s["stage"] in ("env", "build", "smoke", "headline"))
        out.append(f"Stages took {total} s in all; env + build + smoke + headline {core} s "
                   "(goal: at most 480 s on the H200).")
    warm = json.loads(files["warm.json"]) if "warm.json" in files else None
    if warm:
        parts = ", ".join(f"{k} {v.get('seconds')} s" for k, v in warm.get("parts", {}).items())
        out.append(f"Triton warm-up during the build: {len(warm.get('rows', []))} calls, "
                   f"{warm.get('failed', 0)} failed; {parts}.")
    return "\n\n".join(out)


def ceilings(files):
    for name in headline_files(files) + ["bench.json"]:
        if name in files:
            return json.loads(files[name]).get("ceilings", {})
    if "env.json" in files:
        return json.loads(files["env.json"]).get("ceilings", {})
    return {}


def correctness(files):
    """{stage: [(nodeid, outcome, msg)]} for the junit stages present."""
    got = {}
    for stage in JUNIT_STAGES:
        if f"{stage}.xml" in files:
            cases = junit_cases(files[f"{stage}.xml"])
            if cases is not None:
                got[stage] = cases
    return got


def family_status(results):
    """{(family, backend): {"passed": n, "failed": n, "skipped": n}} over all junit stages."""
    counts = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for cases in results.values():
        for nodeid, outcome, _ in cases:
            counts[(smoke.family(nodeid), smoke.backend_of(nodeid) or "-")][outcome] += 1
    return counts


def section_correctness(files):
    results = correctness(files)
    out = ["## Correctness (junit XML of the smoke, tests and large stages)"]
    if not results:
        out.append("No test stage has run.")
        return "\n\n".join(out), {}
    rows = []
    counts = family_status(results)
    for fam in sorted({f for f, _ in counts}):
        cells = [fam]
        for b in BACKENDS + ("-",):
            c = counts.get((fam, b))
            cells.append("-" if c is None else
                         f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
        bad = sum(counts[(fam, b)]["failed"] for b in BACKENDS + ("-",) if (fam, b) in counts)
        ran = sum(counts[(fam, b)]["passed"] for b in BACKENDS + ("-",) if (fam, b) in counts)
        cells.append("FAIL" if bad else ("pass" if ran else "not run"))
        rows.append(cells)
    out.append(table(["kernel family", "cuda", "triton", "torch", "other", "verdict"], rows))
    for stage, cases in results.items():
        n = {k: sum(1 for c in cases if c[1] == k) for k in ("passed", "failed", "skipped")}
        line = f"{stage}: {n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped."
        fails = [c for c in cases if c[1] == "failed"]
        if fails:
            line += "\n" + "\n".join(f"- FAILED {c[0]}: {c[2]}" for c in fails[:40])
            if len(fails) > 40:
                line += f"\n- ... and {len(fails) - 40} more"
        out.append(line)
    san = [(name, files[name].decode(errors="replace")) for name in sorted(files)
           if name.startswith("sanitize-")]
    for name, text in san:
        keep = [ln.strip().lstrip("= ") for ln in text.splitlines()
                if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln or "cases ok" in ln]
        out.append(f"{name[:-4]}: " + ("; ".join(keep) if keep else "no summary line (cut short?)"))
    return "\n\n".join(out), counts


def headline_files(files):
    """The headline stage's JSON files (one per op: headline-<op>.json), in name order."""
    return sorted(n for n in files if n.startswith("headline") and n.endswith(".json"))


def _rows(files):
    """The headline rows of every op, and the ceilings measured with the first of them."""
    rows, ceil = [], {}
    for name in headline_files(files):
        data = json.loads(files[name])
        rows += data.get("results", [])
        ceil = ceil or data.get("ceilings", {})
    return rows, ceil


def _by(rows, op):
    """{(shape key, direction): {impl: row}} for `op`."""
    got = defaultdict(dict)
    for r in rows:
        if r.get("op") == op:
            got[(json.dumps(r["shape"], sort_keys=True), r["direction"])][r["backend"]] = r
    return got


def section_attention(rows):
    pts = _by(rows, "attention")
    if not pts:
        return None, []
    impls = sorted({i for p in pts.values() for i in p if i.startswith("fastlm-")})
    peers = [i for i in ("sdpa-cudnn", "sdpa-flash") if any(i in p for p in pts.values())]
    header = ["D", "S", "causal", "direction"] + impls + peers + ["best fastlm / cuDNN", "goal"]
    body, verdicts = [], []
    for (key, direction), p in sorted(pts.items(), key=lambda kv: (
            json.loads(kv[0][0])["D"], json.loads(kv[0][0])["S"],
            json.loads(kv[0][0])["causal"], kv[0][1])):
        shape = json.loads(key)
        best = max((p[i]["tflops"] for i in impls if i in p and p[i].get("tflops")), default=None)
        ref = p.get("sdpa-cudnn", {}).get("tflops")
        ratio = best / ref if best and ref else None
        ok = None if ratio is None else ratio >= 1.0
        verdicts.append(ok)
        body.append([shape["D"], shape["S"], "yes" if shape["causal"] else "no", direction]
                    + [fmt(p[i].get("tflops")) if i in p else "-" for i in impls + peers]
                    + [fmt(ratio, 2), verdict(ok)])
    return ("### Attention (TFLOP/s, bf16, B·S = 16384 tokens, H·D = 2048)\n\nGoal: "
            + GOALS["attention"] + ".\n\n" + table(header, body)), verdicts


def section_layer_norm(rows, ceil, op="layer_norm", title="LayerNorm"):
    pts = _by(rows, op)
    if not pts:
        return None, []
    copy = ceil.get("copy_gbps")
    impls = sorted({i for p in pts.values() for i in p})
    fast = [i for i in impls if i.startswith("fastlm-")]
    others = [i for i in impls if i not in fast]
    header = (["N", "M", "direction"] + fast + others + ["best fastlm % copy", "goal"])
    body, verdicts = [], []
    for (key, direction), p in sorted(pts.items(), key=lambda kv: (
            json.loads(kv[0][0]).get("N", 0), kv[0][1])):
        shape = json.loads(key)
        best = max((p[i]["gbps"] for i in fast if i in p and p[i].get("gbps")), default=None)
        pct = 100 * best / copy if best and copy else None
        goal = LN_FWD_GOAL if direction == "forward" else LN_BWD_GOAL
        ok = None if pct is None or op != "layer_norm" else pct >= 100 * goal
        verdicts.append(ok)
        body.append([shape.get("N"), shape.get("M"), direction]
                    + [fmt(p[i].get("gbps"), 0) if i in p else "-" for i in fast + others]
                    + [fmt(pct), verdict(ok) if op == "layer_norm" else "-"])
    goal = (GOALS["layer_norm"] + f" ({fmt(copy, 0)} GB/s)") if op == "layer_norm" else \
        "no ANCHORS goal; shown against the same copy bandwidth"
    return (f"### {title} (GB/s: bytes moved / time)\n\nGoal: {goal}.\n\n"
            + table(header, body)), verdicts


def section_adamw(rows, ceil):
    pts = _by(rows, "adamw")
    if not pts:
        return None, []
    copy = ceil.get("copy_gbps")
    impls = sorted({i for p in pts.values() for i in p})
    fast = [i for i in impls if i.startswith("fastlm-")]
    header = ["parameters", "direction"] + [f"{i} ms" for i in impls] + [
        "floor ms", "best fastlm / floor", "goal"]
    body, verdicts, best_ms = [], [], {}
    for (key, direction), p in sorted(pts.items(), key=lambda kv: kv[0][1]):
        shape = json.loads(key)
        any_row = next(iter(p.values()))
        floor = any_row.get("bytes") / copy / 1e6 if any_row.get("bytes") and copy else None
        best = min((p[i]["ms"] for i in fast if i in p), default=None)
        best_ms[(key, direction)] = best
        ratio = best / floor if best and floor else None
        ok = None if ratio is None or direction != "step" else ratio <= ADAM_FLOOR_GOAL
        if direction == "step":
            verdicts.append(ok)
        body.append([shape.get("model", "?"), direction]
                    + [fmt(p[i]["ms"], 3) if i in p else "-" for i in impls]
                    + [fmt(floor, 3), fmt(ratio, 2), verdict(ok) if direction == "step" else ""])
    out = [f"### AdamW (fp32; floor: 28 bytes/parameter at {fmt(copy, 0)} GB/s)\n\nGoal: "
           + GOALS["adamw"] + ".\n\n" + table(header, body)]
    for (key, direction), ms in best_ms.items():
        if direction == "step+clip" and ms and best_ms.get((key, "step")):
            extra = ms / best_ms[(key, "step")] - 1
            ok = extra <= ADAM_CLIP_GOAL - 1
            verdicts.append(ok)
            out.append(f"Clipping fused in: +{100 * extra:.1f}% over the plain step "
                       f"(goal at most +10%): {verdict(ok)}.")
    return "\n\n".join(out), verdicts


def section_gpt(rows):
    pts = _by(rows, "gpt")
    if not pts:
        return None, []
    body, verdicts = [], []
    for (key, direction), p in pts.items():
        shape = json.loads(key)
        for name, r in sorted(p.items(), key=lambda kv: -(kv[1].get("tokens_s") or 0)):
            body.append([name, fmt(r.get("ms")), fmt(r.get("tokens_s"), 0),
                         fmt((r.get("peak_mib") or 0) / 1024, 1), fmt(r.get("x_torch"), 2)])
        f, t = p.get("fastlm-compile"), p.get("torch-compile")
        if f and t and t.get("tokens_s"):
            ratio = f["tokens_s"] / t["tokens_s"]
            mem_ok = (f.get("peak_mib") or 0) <= (t.get("peak_mib") or 0)
            ok = ratio >= GPT_GOAL and mem_ok
            verdicts.append(ok)
            note = (f"fastlm compiled / torch.compile: {ratio:.2f}x tokens/s, peak "
                    f"{fmt((f.get('peak_mib') or 0) / 1024)} vs "
                    f"{fmt((t.get('peak_mib') or 0) / 1024)} GiB: {verdict(ok)}.")
        else:
            note = "fastlm-compile or torch-compile missing: the goal is not measured."
        head = (f"### GPT-2 124M training step ({', '.join(f'{k}={v}' for k, v in shape.items())})"
                f"\n\nGoal: {GOALS['gpt']}.\n\n")
        return head + table(["model", "ms/step", "tokens/s", "peak GiB", "x torch"],
                            body) + "\n\n" + note, verdicts
    return None, []


def read_cuda_order():
    """fastlm/backends.py's CUDA_ORDER (read as text: no torch import)."""
    try:
        with open(os.path.join(ROOT, "fastlm", "backends.py")) as f:
            tree = ast.parse(f.read())
    except OSError:
        return {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == "CUDA_ORDER" for t in targets):
                return ast.literal_eval(node.value)
    return {}


def implied_order(rows, counts):
    """{op: (order, why)}: backends whose family passed its tests, fastest first (geometric
    mean of the speed ratio to the other over the headline points both ran), then torch."""
    out = {}
    for op, (fam, _) in OP_FAMILY.items():
        pts = _by(rows, op)
        cands = []
        for b in ("cuda", "triton"):
            c = counts.get((fam, b))
            if c is None or c["passed"] == 0:
                continue  # untested here: never a default on this evidence
            if c["failed"]:
                continue
            cands.append(b)
        logs = defaultdict(list)
        for p in pts.values():
            ms = {b: p[f"fastlm-{b}"]["ms"] for b in cands if f"fastlm-{b}" in p}
            if len(ms) == len(cands) and cands:
                best = min(ms.values())
                for b, v in ms.items():
                    logs[b].append(math.log(v / best))
        ranked = sorted(cands, key=lambda b: sum(logs[b]) / len(logs[b]) if logs[b] else 1e9)
        why = ", ".join(f"{b} {math.exp(sum(logs[b]) / len(logs[b])):.2f}x the fastest"
                        for b in ranked if logs[b]) or "no timings"
        skipped = [b for b in ("cuda", "triton") if b not in cands]
        if skipped:
            why += "; left out (failed or untested): " + ", ".join(skipped)
        out[op] = (tuple(ranked) + ("torch",), why)
    return out


def section_order(rows, counts):
    cur = read_cuda_order()
    imp = implied_order(rows, counts)
    body = [[op, " > ".join(cur.get(OP_FAMILY[op][1], ("?",))), " > ".join(order), why]
            for op, (order, why) in imp.items()]
    return ("## Default backend per op on CUDA\n\nToday's table is fastlm/backends.py "
            "CUDA_ORDER; the implied order takes the backends whose tests all passed in this run "
            "(smoke, tests, large), fastest first by the geometric mean of their time ratios over "
            "the headline points.\n\n" + table(["op", "today", "implied by this run", "evidence"],
                                              body))


def summary(verdict_lists, counts):
    lines = ["## Summary"]
    fams = sorted({f for f, _ in counts})
    for fam in fams:
        bad = [b for b in BACKENDS if counts.get((fam, b), {}).get("failed")]
        ran = sum(counts.get((fam, b), {}).get("passed", 0) for b in BACKENDS + ("-",))
        lines.append(f"- {fam}: " + (f"FAILED on {', '.join(bad)}" if bad else
                                      ("all tests passed" if ran else "not run (skipped)")))
    for name, vs in verdict_lists.items():
        measured = [v for v in vs if v is not None]
        if not vs:
            continue
        met = sum(measured)
        lines.append(f"- {name} goal: met at {met} of {len(measured)} measured rows"
                     + (f" ({len(vs) - len(measured)} not measured)" if len(measured) < len(vs)
                        else ""))
    return "\n".join(lines)


def report(folders):
    files, stages = merge(folders)
    rows, ceil = _rows(files)
    if not ceil:
        ceil = ceilings(files)
    corr, counts = section_correctness(files)
    parts, verdicts = [], {}
    for name, (text, vs) in (("attention", section_attention(rows)),
                             ("LayerNorm", section_layer_norm(rows, ceil)),
                             ("add+LayerNorm", section_layer_norm(rows, ceil, "add_layer_norm",
                                                                  "Fused add + LayerNorm")),
                             ("AdamW", section_adamw(rows, ceil)),
                             ("GPT step", section_gpt(rows))):
        if text:
            parts.append(text)
            verdicts[name] = vs
    out = ["# fastlm GPU check", summary(verdicts, counts), section_run(files, stages), corr]
    if parts:
        out.append("## Headline benchmarks (`fastlm bench --profile headline`)")
        out += parts
    else:
        out.append("## Headline benchmarks\n\nNot run.")
    out.append(section_order(rows, counts))
    return "\n\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="results folders of scripts/gpu_run.sh")
    p.add_argument("--out", help="write the markdown here too")
    a = p.parse_args(argv)
    for f in a.folders:
        if not os.path.isdir(f):
            p.error(f"{f} is not a folder")
    text = report(a.folders)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
