#!/usr/bin/env bash
# The GPU check: a staged, time-boxed run for the rare, short GPU lease (../shared/GPU.md:
# one H200, 15 minutes of device time in all, at most 10 minutes a command).
#
#   bash scripts/gpu_run.sh [--stages LIST] [--deadline SECONDS] [--dry-run] RESULTS
#
# Stages, in this order, each under its own `timeout`; each one's results are packed into
# RESULTS the moment it ends, so a run cut short still returns everything measured so far:
#   env       GPU, clocks, versions, tools; copy bandwidth and bf16 matmul ceilings measured
#   build     pip install -e . with all cores (sm_90a), while scripts/gpu_warm.py fills Triton's
#             cache with the kernels the smoke and headline stages use (and torch.compile's)
#   smoke     pytest -m smoke: every kernel of every backend once per dtype and feature
#   headline  "$PY" -m fastlm bench --profile headline --device cuda (attention, LayerNorm, AdamW, GPT)
#   tests     the rest of the `cuda` tests (not smoke, not slow)
#   sanitize  compute-sanitizer memcheck and racecheck over scripts/gpu_sanitize.py
#   large     tests/test_large_tensors.py: more than 2^31 elements per tensor (cuda, slow)
#   bench     the full benchmark grid (fastlm bench --device cuda)
# Default: all of them, in that order, as time allows: a stage starts only if at least
# MIN_START seconds remain before the deadline, and its timeout is cut to what remains.
# Stages that need the extension build it first when fastlm._C with CUDA kernels does not load
# (a second call on a fresh machine), unless `build` is listed anyway.
#
# One call of about 8 minutes covers env, build, smoke and headline (see EXPECT below) and
# leaves time for a second call with fixes, e.g. `--stages smoke,tests,sanitize,large`.
# Run it from the device tool as:
#   bash scripts/gpu_run.sh --deadline 560 "$OUT"            (timeout_s 600)
#
# RESULTS holds at most five files (the device tool returns at most 8 files per call):
#   run.log         this script's progress, with the tail of each stage's log
#   stages.tsv      stage, status (pass/fail/timeout/skipped), exit code, seconds, expected, cap
#   results.tar.gz  every stage's files: env.json, build.log, warm.json, smoke.xml, smoke.log,
#                   headline-<op>.json, tests.xml, sanitize-*.log, large.xml, bench.json ...
#   report.md       scripts/gpu_report.py's tables and summary (rewritten after every stage)
# Read them with: python3 scripts/gpu_report.py RESULTS [RESULTS2 ...]
#
# --dry-run runs the same stages on a machine without a GPU, with tiny shapes: no rebuild (the
# installed extension is used), Triton's interpreter and the C++ CPU kernels stand in for the
# GPU kernels, tests marked `cuda` are collected and skipped, compute-sanitizer is not run (its
# driver runs on the CPU kernels). tests/test_gpu_run.py runs it in CI.
set -u -o pipefail

# Expected seconds per stage on the H200 (16 cores), and how each was estimated. Recorded in
# stages.tsv next to the measured time; nothing here has been measured on an H200 yet. CPU times
# below were measured on the 2-core development machine (user + sys, so other load does not count).
declare -A EXPECT=(
  # python + torch import (~5 s), CUDA init, do_bench of a 2 GiB copy and a bf16 8192^3 matmul.
  [env]=20
  # The slowest translation unit bounds a 16-job build: csrc/cpu/layer_norm.cpp 112 s of CPU
  # (g++ -O3, target_clones over three ISAs), csrc/cuda/attention.cu for sm_90a alone 69 s, the
  # others less; all at once on 16 cores -> ~115 s, + pip ~15 s, + at most 30 s for the Triton
  # warm-up to finish its current part. The warm-up itself runs beside nvcc on the idle cores.
  [build]=150
  # 486 tests (tests/smoke.py; 418 before the Llama-class ops and attention options joined),
  # ~0.1-0.3 s each on 8 xdist workers (~17 s) plus
  # worker start (~15 s), plus the Triton kernels the warm-up did not compile: at most 4 per
  # attention test (59) and 3 per LayerNorm/Adam test (100), ~540 kernels x 1.1 s (24 sm_90a
  # kernels took 27 s of CPU with `fastlm compile`, triton 3.8) ~ 600 CPU-s, an upper bound;
  # the warm-up's 4 workers take most of them during the build: ~30-60 s warm, ~110 s cold.
  [smoke]=60
  # the lead's headline profile: attention 16 points x 5 implementations, LayerNorm 6 x 4,
  # AdamW 2 x 2, do_bench ~0.3 s each (~35 s), float32 oracles, and the GPT step: 4 rows, two
  # of them compiled (~40 s each with inductor's cache warm from the build, ~90 s cold).
  [headline]=200
  # ~1400 cuda tests not in smoke (tests with torch.compile dominate: ~15 of them, ~20 s each)
  [tests]=300
  # torch's CUDA init under the sanitizer (~30 s) + ~120 cases x a few launches, twice (memcheck,
  # racecheck)
  [sanitize]=180
  # 8-36 GB tensors: allocation, one kernel each, float32 checks of sampled rows; 10 tests
  [large]=120
  # the full grid: about 10 minutes (fastlm bench's own estimate on the H100)
  [bench]=600
)
# env + build + smoke + headline: 430 s expected, inside the 8 minutes (480 s) of the goal.
declare -A CAP=([env]=90 [build]=420 [smoke]=240 [headline]=300 [tests]=420 [sanitize]=300
                [large]=240 [bench]=600)
ORDER=(env build smoke headline tests sanitize large bench)
NEEDS_EXT=" smoke headline tests sanitize large bench "
MIN_START=${FASTLM_GPU_RUN_MIN_START:-30}   # seconds a stage needs left to be worth starting
RESERVE=10                                   # seconds kept for packing after the last stage

usage() { sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

# ---------------------------------------------------------------------------------------------
# Stage bodies: run as `bash gpu_run.sh --stage-impl NAME` under `timeout`, with W (the work
# folder), DRY, PY, NJOBS exported by the driver below. Each writes its files into $W.
stage_env() {
  nvidia-smi -q > "$W/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available" > "$W/nvidia-smi.txt"
  local dev=cuda; [ "$DRY" = 1 ] && dev=cpu
  "$PY" scripts/gpu_env.py --device "$dev" --json "$W/env.json"
}

stage_build() {
  local rc wpid t0=$SECONDS
  if [ "$DRY" = 1 ]; then
    # No rebuild (CI built the extension); the warm-up's code path through the interpreter.
    "$PY" scripts/gpu_warm.py --device cpu --parts headline --ops layer_norm \
      --json "$W/warm.json" > "$W/warm.log" 2>&1
    echo "warm-up: exit $? (dry run, interpreter)"
    rc=0
  else
    # The warm-up imports fastlm from the source tree while pip builds; it runs on the GPU,
    # which is idle meanwhile.
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      timeout --signal=TERM --kill-after=10 "${CAP[build]}" \
      "$PY" scripts/gpu_warm.py --device cuda --json "$W/warm.json" > "$W/warm.log" 2>&1 &
    wpid=$!
    # the warm-up has its own process group: stop it too if this stage is stopped
    trap 'kill -TERM "$wpid" 2>/dev/null' EXIT INT TERM
    MAX_JOBS=$NJOBS "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1
    rc=$?
    echo "build: exit $rc in $(( SECONDS - t0 )) s"
    # The warm-up may finish its last part meanwhile; after 30 s it yields to the next stage.
    for _ in $(seq 30); do kill -0 "$wpid" 2>/dev/null || break; sleep 1; done
    kill -TERM "$wpid" 2>/dev/null && echo "warm-up: still running after the build; stopped"
    wait "$wpid"; echo "warm-up: exit $? after $(( SECONDS - t0 )) s"
  fi
  tail -3 "$W/warm.log"
  "$PY" -m fastlm info > "$W/info.txt" 2>&1
  cat "$W/info.txt"
  return $rc
}

_pytest() {  # NAME MARKEXPR [paths...]: pytest with junit XML, in parallel when xdist exists
  local name=$1 expr=$2; shift 2
  local par=()
  if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then par=(-n "${PYTEST_WORKERS:-8}"); fi
  "$PY" -m pytest -q -m "$expr" "${par[@]}" -p no:cacheprovider --tb=short -rfE \
    --junitxml="$W/$name.xml" "$@" 2>&1
}

stage_smoke() { _pytest smoke "smoke" tests; }

stage_headline() {
  # One `fastlm bench` per op, each JSON written as it ends (and rewritten after each case): a
  # stage cut short keeps the ops it finished. The dry run leaves out the torch.compile rows,
  # which take minutes on two cores, and times each row briefly; every op's headline path runs.
  local dev=cuda ops op rc=0 skip=()
  [ "$DRY" = 1 ] && { dev=cpu; skip=(--skip-impl '*compile*' --budget 0.01); }
  read -r -a ops < <("$PY" -c "from fastlm import bench
print(' '.join(o for o in bench.names() if bench.get(o).shape_list('$dev', 'headline')))")
  echo "headline ops: ${ops[*]}"
  for op in "${ops[@]}"; do
    "$PY" -m fastlm bench "$op" --profile headline --device "$dev" --no-progress "${skip[@]}" \
      --json "$W/headline-$op.json" 2>&1 || rc=$?
  done
  return $rc
}

stage_tests() {
  # The dry run collects one file: its cuda tests are skipped anyway, and collecting the whole
  # suite again costs CI half a minute.
  local paths=(tests); [ "$DRY" = 1 ] && paths=(tests/test_optim.py)
  _pytest tests "cuda and not smoke and not slow" "${paths[@]}"
}

stage_sanitize() {
  if [ "$DRY" = 1 ]; then
    "$PY" scripts/gpu_sanitize.py --device cpu --dtypes bfloat16 2>&1 | tee "$W/sanitize-cpu.log"
    return "${PIPESTATUS[0]}"
  fi
  local cs rc=0 tool
  cs=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 3 --print-limit 40 \
      "$PY" scripts/gpu_sanitize.py --device cuda > "$W/sanitize-$tool.log" 2>&1
    local r=$?
    echo "$tool: exit $r"; tail -5 "$W/sanitize-$tool.log"
    [ $r -ne 0 ] && rc=$r
  done
  return $rc
}

stage_large() { _pytest large "cuda and slow" tests/test_large_tensors.py; }

stage_bench() {
  local dev=cuda prof=full; [ "$DRY" = 1 ] && { dev=cpu; prof=tiny; }
  local ops=(); [ "$DRY" = 1 ] && ops=(attention)
  "$PY" -m fastlm bench "${ops[@]}" --profile "$prof" --device "$dev" --no-progress \
    --json "$W/bench.json" --plot "$W/bench.png" 2>&1
}

SELF=$(readlink -f "$0")
if [ "${1:-}" = "--stage-impl" ]; then
  cd "$(dirname "$SELF")/.." || exit 2
  "stage_$2"
  exit $?
fi

# ---------------------------------------------------------------------------------------------
# The driver.
DRY=0 STAGES="" DEADLINE=${FASTLM_GPU_RUN_DEADLINE:-560} RESULTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) STAGES=$2; shift ;;
    --stages=*) STAGES=${1#*=} ;;
    --deadline) DEADLINE=$2; shift ;;
    --deadline=*) DEADLINE=${1#*=} ;;
    -h|--help) usage 0 ;;
    -*) echo "gpu_run.sh: unknown option $1" >&2; usage 2 ;;
    *) [ -n "$RESULTS" ] && { echo "gpu_run.sh: one RESULTS folder, got $RESULTS and $1" >&2; exit 2; }
       RESULTS=$1 ;;
  esac
  shift
done
[ -n "$RESULTS" ] || { echo "gpu_run.sh: give the RESULTS folder (the device tool's \$OUT)" >&2; exit 2; }
case "$DEADLINE" in ''|*[!0-9]*) echo "gpu_run.sh: --deadline takes seconds, got '$DEADLINE'" >&2; exit 2 ;; esac
STAGES=${STAGES:-$(IFS=,; echo "${ORDER[*]}")}
for s in ${STAGES//,/ }; do
  [ -n "${CAP[$s]:-}" ] || { echo "gpu_run.sh: unknown stage '$s': choose from ${ORDER[*]}" >&2; exit 2; }
done

mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$SELF")/.." || exit 2
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || PY=python
W=$(mktemp -d "${TMPDIR:-/tmp}/fastlm-gpu-run.XXXXXX")
NJOBS=${MAX_JOBS:-$(nproc)}
export W DRY PY NJOBS PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FASTLM_CUDA_ARCHS=${FASTLM_CUDA_ARCHS:-9.0a}
[ "$DRY" = 1 ] || export FASTLM_REQUIRE_CUDA=1
T_START=$SECONDS
T_END=$(( SECONDS + DEADLINE ))

log() { echo "$*" | tee -a "$RESULTS/run.log"; }

pack() {  # everything measured so far into RESULTS, atomically
  cp "$RESULTS/stages.tsv" "$W/stages.tsv"
  tar czf "$RESULTS/results.tar.gz.tmp" -C "$W" . && mv "$RESULTS/results.tar.gz.tmp" "$RESULTS/results.tar.gz"
  "$PY" scripts/gpu_report.py "$RESULTS" --out "$RESULTS/report.md" > "$W/report.log" 2>&1 \
    || log "   (gpu_report.py failed: $(tail -1 "$W/report.log"))"
}

record() {  # stage status exit seconds
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${EXPECT[$1]}" "${CAP[$1]}" >> "$RESULTS/stages.tsv"
}

ext_ready() {
  [ "$DRY" = 1 ] && return 0
  "$PY" -c "import sys, fastlm; sys.exit(0 if fastlm._ext.cuda_archs() else 1)" 2>/dev/null
}

run_stage() {
  local name=$1 left limit t0 rc status
  left=$(( T_END - SECONDS - RESERVE ))
  if [ "$left" -lt "$MIN_START" ]; then
    log "== $name: skipped (${left} s left before the deadline)"
    record "$name" skipped "" 0; return 0
  fi
  limit=${CAP[$name]}; [ "$left" -lt "$limit" ] && limit=$left
  log "== $name (timeout ${limit} s; expected ${EXPECT[$name]} s on the H200) at +$(( SECONDS - T_START )) s"
  t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" bash "$SELF" --stage-impl "$name" > "$W/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=pass ;; 124|137) status=timeout ;; *) status=fail ;; esac
  record "$name" "$status" "$rc" "$(( SECONDS - t0 ))"
  log "   $name: $status (exit $rc) in $(( SECONDS - t0 )) s"
  tail -n 12 "$W/$name.log" | sed 's/^/   | /' | tee -a "$RESULTS/run.log" > /dev/null
  pack
}

: > "$RESULTS/run.log"
printf 'stage\tstatus\texit\tseconds\texpected_s\tcap_s\n' > "$RESULTS/stages.tsv"
log "fastlm GPU check: stages ${STAGES}; deadline ${DEADLINE} s; dry run: $DRY; $(date -u +%FT%TZ)"
log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)'); work folder $W"
built=0
for s in "${ORDER[@]}"; do
  case ",$STAGES," in *",$s,"*) ;; *) continue ;; esac
  if [ "$s" = build ]; then built=1; fi
  if [ $built = 0 ] && [[ "$NEEDS_EXT" == *" $s "* ]] && ! ext_ready; then
    log "== fastlm._C with CUDA kernels does not load here: building first"
    run_stage build; built=1
  fi
  run_stage "$s"
done
log "done in $(( SECONDS - T_START )) s: $(awk -F'\t' 'NR>1{printf "%s=%s ", $1, $2}' "$RESULTS/stages.tsv")"
pack
rm -rf "$W"
# Exit status: 0 when every stage that ran passed.
! awk -F'\t' 'NR>1 && ($2=="fail" || $2=="timeout"){bad=1} END{exit !bad}' "$RESULTS/stages.tsv"
