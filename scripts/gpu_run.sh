#!/usr/bin/env bash
# On a machine with a GPU (see ../shared/GPU.md): build fastlm for that GPU, run the `cuda`
# tests, then the benchmarks; logs, JSON and plot go to RESULTS (default: results/).
#   bash scripts/gpu_run.sh [RESULTS] [extra `fastlm bench` arguments...]
set -o pipefail
RESULTS=${1:-results}
shift || true
mkdir -p "$RESULTS"
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FASTLM_CUDA_ARCHS=${FASTLM_CUDA_ARCHS:-9.0a}
export PYTHONUNBUFFERED=1 FASTLM_REQUIRE_CUDA=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$RESULTS/gpu.txt" 2>&1
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1
rc=$?
echo "build: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$RESULTS/build.log"
tail -5 "$RESULTS/build.log"
[ $rc -eq 0 ] || exit $rc
fastlm info 2>&1 | tee "$RESULTS/info.log"
python3 -m pytest -q -m cuda tests 2>&1 | tee "$RESULTS/tests.log" | tail -30
trc=${PIPESTATUS[0]}
if [ "$trc" -ne 0 ]; then
  # Still time: every benchmark row carries its max error against the oracle, and the ops
  # that pass are worth measuring. The failures are in tests.log.
  echo "WARNING: cuda tests failed (exit $trc); benchmark rows of failing ops are suspect" \
    | tee -a "$RESULTS/tests.log"
fi
fastlm bench --device cuda --json "$RESULTS/bench.json" --plot "$RESULTS/bench.png" "$@" 2>&1 \
  | tee "$RESULTS/bench.log" | tail -60
exit "$trc"
