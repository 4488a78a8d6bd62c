#!/usr/bin/env bash
# The one-call GPU validation of swa_fast (docs/GPU_VALIDATION.md says how to run it and what it checks).
#
#   tools/gpu_check.sh OUTDIR            on the GPU machine, from any directory
#   tools/gpu_check.sh --dry-run OUTDIR  on a CPU machine: the same plumbing, CPU counterparts, < 2 minutes
#
# Stages: env, build, tests, sanitizer, graph, bench, recipe. Each runs under its own
# timeout, cut to what is left of the whole budget (GPU_CHECK_BUDGET_S, default 520 s, for a
# device call with timeout_s 560), continues past an earlier stage's failure, and appends its
# output to OUTDIR/check.log as it goes. The last thing printed is the table of stages (status,
# seconds, key figure); OUTDIR/summary.json holds the same plus the benchmark targets.
# OUTDIR ends with at most 6 files: check.log, summary.json, junit.xml, bench.json,
# bench-args32k.json and recipe.md.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${GPU_CHECK_PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-520}
START=$SECONDS
LOG=$OUT/check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
ROWS=$WORK/rows.tsv
CORES=$(nproc 2>/dev/null || echo 2)
BUILD_OK=1
ALT_PID=""
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
: >"$LOG"
: >"$ROWS"

# The background build runs in its own session (setsid), so it is stopped as a process group.
stop_alt_build() {
  if [[ -n "$ALT_PID" ]]; then
    kill -- "-$ALT_PID" 2>/dev/null || kill "$ALT_PID" 2>/dev/null
    ALT_PID=""
  fi
}

cleanup() {
  stop_alt_build
  rm -rf "$WORK"
}
trap cleanup EXIT

# -- stage machinery ---------------------------------------------------------------------------

# Seconds left to the running stage (its deadline, set by run_stage).
left() { echo $((DEADLINE - SECONDS)); }

# timed CMD...: CMD under the stage's remaining time (exit 124 when it runs out).
timed() {
  local t
  t=$(left)
  if ((t <= 0)); then return 124; fi
  timeout -k 10 "$t" "$@"
}

# run_stage NAME NOMINAL RESERVE FUNCTION: FUNCTION gets min(NOMINAL, budget left - RESERVE)
# seconds (RESERVE: the least the later stages need). It sets KEY (the key figure) and
# returns 0 (ok), 3 (STATUS set by the function, e.g. skipped) or anything else (failed;
# 124: timeout). Its output goes to the log only.
run_stage() {
  local name=$1 nominal=$2 reserve=$3 fn=$4 begin=$SECONDS rc
  local budget_left=$((BUDGET - (SECONDS - START) - reserve))
  local t=$((nominal < budget_left ? nominal : budget_left))
  DEADLINE=$((SECONDS + t))
  KEY=""
  STATUS=""
  echo "==== $name: up to ${t} s, started $(date -u +%H:%M:%S) (${SECONDS}s into the check) ====" | tee -a "$LOG"
  if ((t < 5)); then
    STATUS="skipped (no time left)"
  elif ((BUILD_OK == 0)) && [[ "$name" != "env" && "$name" != "build" ]]; then
    STATUS="skipped (build failed)"
  else
    "$fn" >>"$LOG" 2>&1
    rc=$?
    if ((rc == 3)); then
      :
    elif ((rc == 0)); then
      STATUS="ok"
    elif ((rc == 124 || rc == 137)); then
      STATUS="timeout"
    else
      STATUS="failed (exit $rc)"
    fi
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$STATUS" "$((SECONDS - begin))" "${KEY//$'\t'/ }" >>"$ROWS"
  echo "---- $name: $STATUS in $((SECONDS - begin)) s: $KEY" | tee -a "$LOG"
}

# The key figure from a command's first output line (the rest goes to the log).
key_from() {
  local output rc
  output=$("$@" 2>>"$LOG")
  rc=$?
  KEY=$(head -n 1 <<<"$output")
  tail -n +2 <<<"$output"
  return $rc
}

# -- stages ------------------------------------------------------------------------------------

stage_env() {
  date -u
  uname -a
  echo "cores: $CORES"
  free -g 2>/dev/null | head -2
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  for tool in nvcc compute-sanitizer ncu ninja; do
    if command -v "$tool" >/dev/null; then
      echo "$tool: $("$tool" --version 2>&1 | tail -n 1)"
    else
      echo "$tool: not found"
    fi
  done
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())"
  key_from "$PY" tools/gpu_check_report.py env
}

stage_build() {
  if ((DRY)); then
    key_from "$PY" -c "import swa_fast; info = swa_fast.BUILD_INFO; print(f\"not built (dry run); this checkout's build: cuda={info['cuda']}, {info['kernel_arg_bytes']}-byte kernel args\")"
    STATUS="skipped (dry run)"
    return 3
  fi
  export TORCH_CUDA_ARCH_LIST=9.0 SWA_FAST_CUDA=1 MAX_JOBS=$CORES
  local begin=$SECONDS rc
  rm -f swa_fast/_C*.so
  timed "$PY" setup.py build_ext --inplace
  rc=$?
  if ((rc != 0)); then
    BUILD_OK=0
    KEY="the CUDA build failed (exit $rc after $((SECONDS - begin)) s); the errors are in check.log"
    grep -m 20 -E "error|Error" "$LOG" | sed 's/^/  /' >&2
    return "$rc"
  fi
  local built=$((SECONDS - begin))
  if ! key_from "$PY" -c "import swa_fast; i = swa_fast.BUILD_INFO; assert i['cuda'], 'built without CUDA kernels'; print(f\"built in $built s: archs {i['cuda_archs']}, {i['kernel_arg_bytes']}-byte kernel args, CPU {i['cpu_capability']}\")"; then
    BUILD_OK=0
    KEY="built, but swa_fast does not import with CUDA kernels: $KEY"
    return 1
  fi
  # The other kernel-argument budget (32 KB), built in the background at low priority while
  # the tests run, for the bench stage to measure both in this one call.
  mkdir -p "$WORK/args32k"
  tar --exclude=./.git --exclude=./build --exclude='./swa_fast/_C*.so' --exclude=./.venv -cf - . |
    tar -xf - -C "$WORK/args32k"
  # shellcheck disable=SC2016  # expanded by the inner bash
  setsid bash -c 'cd "$1" && SWA_FAST_KERNEL_ARG_BYTES=32768 MAX_JOBS=$2 nice -n 10 timeout 420 "$3" setup.py \
    build_ext --inplace >"$4" 2>&1; echo $? >"$5"' _ "$WORK/args32k" $((CORES / 2 > 1 ? CORES / 2 : 1)) "$PY" \
    "$WORK/args32k.log" "$WORK/args32k.rc" &
  ALT_PID=$!
  echo "building the 32 KB kernel-argument variant in the background (pid $ALT_PID)"
}

stage_tests() {
  local timeout_flag=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    timeout_flag=(--timeout=120)
  fi
  timed "$PY" -m pytest -m cuda -q -rfE -p no:cacheprovider "${timeout_flag[@]}" \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit2 tests
  local rc=$?
  key_from "$PY" tools/gpu_check_report.py junit "$OUT/junit.xml"
  local parsed=$?
  if ((DRY)); then
    KEY="$KEY (CPU: the GPU tests skip)"
    STATUS="skipped (dry run)"
    ((rc == 0 && parsed == 0)) && return 3
  fi
  ((rc == 124)) && return 124
  return $parsed
}

stage_sanitizer() {
  if ((DRY)); then
    key_from timed "$PY" tools/gpu_sanitize.py --device cpu
    local rc=$?
    KEY="driver on the CPU kernels: ${KEY#gpu_sanitize: }"
    STATUS="skipped (dry run)"
    ((rc == 0)) && return 3
    return $rc
  fi
  if ! command -v compute-sanitizer >/dev/null; then
    KEY="compute-sanitizer not found"
    STATUS="skipped (no tool)"
    return 3
  fi
  local tool pids=() t
  t=$(left)
  for tool in memcheck racecheck initcheck; do
    local extra=()
    [[ $tool == memcheck ]] && extra=(--leak-check no)
    timeout -k 10 "$t" compute-sanitizer --tool "$tool" "${extra[@]}" --print-limit 20 --error-exitcode 99 \
      "$PY" tools/gpu_sanitize.py >"$WORK/sanitizer-$tool.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  for tool in memcheck racecheck initcheck; do
    echo "---------------- compute-sanitizer --tool $tool ----------------"
    cat "$WORK/sanitizer-$tool.log"
  done
  key_from "$PY" tools/gpu_check_report.py sanitizer \
    "$WORK/sanitizer-memcheck.log" "$WORK/sanitizer-racecheck.log" "$WORK/sanitizer-initcheck.log"
}

stage_graph() {
  local output rc
  output=$(timed "$PY" tools/gpu_graph_check.py 2>&1 $( ((DRY)) && echo --device cpu))
  rc=$?
  echo "$output"
  KEY=$(grep '^graph_check:' <<<"$output" | sed 's/^graph_check: //' | awk 'NR > 1 { printf "; " } { printf "%s", $0 }')
  if ((DRY)); then
    STATUS="skipped (dry run)"
    ((rc == 0)) && return 3
  fi
  return $rc
}

stage_bench() {
  if ((DRY)); then
    timed "$PY" benchmarks/run.py --device cpu --quick --cases resnet50 distance_resnet50 \
      --output "$OUT/bench.json"
    local rc=$?
    key_from "$PY" tools/gpu_check_report.py bench "$OUT/bench.json" "" "$OUT/targets.json"
    KEY="CPU counterpart: $KEY"
    STATUS="skipped (dry run)"
    ((rc == 0)) && return 3
    return $rc
  fi
  local settings=(--device cuda --repeats 15 --warmup 3 --budget 4)
  timed "$PY" benchmarks/run.py "${settings[@]}" --output "$OUT/bench.json"
  local rc=$?
  # The 32 KB variant: wait for its build (a little), then measure the cases the budget changes.
  while [[ -n "$ALT_PID" && ! -f "$WORK/args32k.rc" ]] && (($(left) > 60)); do sleep 2; done
  if [[ -f "$WORK/args32k.rc" && "$(cat "$WORK/args32k.rc")" == 0 ]]; then
    (cd "$WORK/args32k" && timed "$PY" benchmarks/run.py "${settings[@]}" \
      --cases resnet50 transformer billion billion_bf16 distance_transformer --output "$OUT/bench-args32k.json")
  else
    echo "the 32 KB kernel-argument build did not finish or failed:"
    tail -n 30 "$WORK/args32k.log" 2>/dev/null
  fi
  key_from "$PY" tools/gpu_check_report.py bench "$OUT/bench.json" "$OUT/bench-args32k.json" "$OUT/targets.json"
  local parsed=$?
  ((rc != 0)) && return $rc
  return $parsed
}

stage_recipe() {
  local data="$WORK/fashion" run="$WORK/recipe" args sizes
  # The dry run's CPU counterpart is kept small: CI machines are shared and slow.
  sizes=$( ((DRY)) && echo "1024, 256" || echo "8192, 2048")
  "$PY" -c "import sys; sys.path.insert(0, 'examples'); from recipe_lib.datasets import write_synthetic_fashion_mnist as w; w('$data', $sizes)" || return 1
  if ((DRY)); then
    args=(--device cpu --budget 2 --swa-start 1 --batch-size 128)
  else
    args=(--device cuda --amp bf16 --channels-last --budget 6 --swa-start 4 --batch-size 128)
  fi
  timed "$PY" examples/swa_paper.py --train-subset 0 --test-subset 0 "${args[@]}" --data-dir "$data" \
    --no-progress --out "$run"
  local rc=$?
  [[ -f "$run/results.md" ]] && cp "$run/results.md" "$OUT/recipe.md"
  key_from "$PY" tools/gpu_check_report.py recipe "$run"
  KEY="synthetic Fashion-MNIST, $( ((DRY)) && echo "CPU" || echo "bf16 channels_last"): $KEY"
  if ((DRY)); then
    STATUS="skipped (dry run)"
    ((rc == 0)) && return 3
  fi
  return $rc
}

# -- the check -----------------------------------------------------------------------------------

echo "gpu_check: $( ((DRY)) && echo "DRY RUN on $(uname -n)" || echo "on $(uname -n)"), budget ${BUDGET} s," \
  "commit ${SWA_FAST_GIT_COMMIT:-unknown (set SWA_FAST_GIT_COMMIT)}, output $OUT" | tee -a "$LOG"
# NAME, nominal seconds, reserve (the least the later stages need: tests 60, sanitizer 40,
# graph 20, bench 80, recipe 30), so an overrunning stage cannot starve the ones after it.
run_stage env 30 480 stage_env
run_stage build 240 230 stage_build
run_stage tests 150 170 stage_tests
run_stage sanitizer 120 130 stage_sanitizer
run_stage graph 45 110 stage_graph
run_stage bench 170 30 stage_bench
run_stage recipe 90 0 stage_recipe
stop_alt_build

echo "==== summary (${SECONDS}s) ====" | tee -a "$LOG"
"$PY" tools/gpu_check_report.py report "$ROWS" "$OUT" | tee -a "$LOG"
# The status of the check: 0 when no stage failed or timed out.
if cut -f2 "$ROWS" | grep -qE '^(failed|timeout)'; then
  exit 1
fi
exit 0
