#!/usr/bin/env bash
# The one command for the GPU figures of docs/gpu.md (issues 16, 23), on a lent H100/H200:
#
#   bash bench/gpu_run.sh --budget 540     # what fits in 540 s, in order of value: SDXL, FLUX.1-schnell,
#                                          # Qwen-Image (bench/gpu_plan.py; docs/gpu.md has the estimates)
#   bash bench/gpu_run.sh --families sdxl  # one family, its full plan (still under a timeout)
#   bash bench/gpu_run.sh --ladder ...     # each family also adds its optimisations one at a time
#   bash bench/gpu_run.sh --cpu-smoke ...  # the same orchestration, tiny models on a CPU (tests)
#   bench/gpu_run.sh --download-wheels     # here, with a registry: bench/gpu_wheels.txt -> .cache/gpu-wheels/
#
# The lent machine reaches no registry and lacks diffusers and pydantic: carry .cache/gpu-wheels
# beside the working tree; they go into a target folder ahead of the machine's own packages.
# One process per family (a fresh process holds no compiled graph and no GPU memory of the
# last), each under its own `timeout`: what is left of the budget. Each writes its JSON after
# every measurement and copies it to $OUT, where the log goes too, so a timeout or a crash keeps
# what was measured. At the end docs/gpu.md is rewritten and copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
RESULTS=${GPU_RUN_RESULTS:-bench/results}
OUT_DIR=${OUT:-}
RESERVE_S=20 # kept back from the budget for the page and the copies (bench/gpu_plan.py RESERVE_S)
NO_BUDGET_TIMEOUT_S=1800
BUDGET="" FAMILIES="sdxl,flux,qwen-image" LADDER="" SMOKE=""

download_wheels() {
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" -r bench/gpu_wheels.txt
}

while (($#)); do
  case $1 in
    --budget) BUDGET=$2; shift 2 ;;
    --families) FAMILIES=$2; shift 2 ;;
    --ladder) LADDER=--ladder; shift ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --download-wheels) download_wheels; exit ;;
    *) echo "unknown argument: $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

mkdir -p "$RESULTS"
LOGS=("$RESULTS/gpu_run.log")
[[ -n $OUT_DIR ]] && LOGS+=("$OUT_DIR/gpu_run.log")
JSON="$RESULTS/gpu_pipeline.json"
[[ -n $SMOKE ]] && JSON="$RESULTS/gpu_pipeline_smoke.json"

log() { echo "[gpu_run ${SECONDS}s] $*" | tee -a "${LOGS[@]}"; }

install_wheels() {
  if "$PY" -c "import diffusers, pydantic" 2>/dev/null; then
    return 0
  fi
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "diffusers/pydantic missing and no wheels in $WHEELS: run bench/gpu_run.sh --download-wheels where a registry is reachable, and carry $WHEELS"
    return 1
  fi
  local site=/tmp/gpu-run-site
  rm -rf "$site"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl 2>&1 | tail -3
  else
    # No pip: a wheel is a zip of what goes on sys.path.
    for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$site"; done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  local wheels=("$WHEELS"/*.whl)
  log "installed ${#wheels[@]} wheels into $site"
}

check_device() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "${LOGS[@]}"
  "$PY" -c "import sys, torch, diffusers, transformers, pydantic
assert torch.cuda.is_available(), 'no CUDA device'
print(torch.cuda.get_device_name(), 'python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.VERSION)" 2>&1 | tee -a "${LOGS[@]}"
}

# Prints "<estimated seconds> <gpu_pipeline.py arguments>" for the fullest job of $1 that fits in
# $2 seconds; fails when none does.
plan_family() {
  if [[ -n $SMOKE ]]; then
    echo "30 --cpu-smoke --families $1 --repeats 1 --batch-sizes 1 --step-probe 2,3 $LADDER"
  else
    "$PY" bench/gpu_plan.py fit "$1" "$2" $LADDER
  fi
}

run_family() {
  local family=$1 left planned estimate args limit rc
  if [[ -n $BUDGET ]]; then left=$((BUDGET - SECONDS - RESERVE_S)); else left=$NO_BUDGET_TIMEOUT_S; fi
  if ((left < 1)) || ! planned=$(plan_family "$family" "$left"); then
    log "$family: skipped, no job of it fits in the ${left} s left (bench/gpu_plan.py)"
    return 0
  fi
  read -r estimate args <<<"$planned"
  limit=$left
  log "$family: estimated ${estimate} s, timeout ${limit} s: bench/gpu_pipeline.py $args"
  # shellcheck disable=SC2086  # $args is a list of arguments
  timeout --kill-after=15 "$limit" "$PY" bench/gpu_pipeline.py $args --out "$JSON" ${OUT_DIR:+--copy-to "$OUT_DIR"} \
    2>&1 | tee -a "${LOGS[@]}"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) log "$family: done" ;;
    124 | 137) log "$family: stopped by its ${limit} s timeout; $JSON keeps what it measured" ;;
    *) log "$family: failed (exit $rc); $JSON keeps what it measured" ;;
  esac
  return "$rc"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log "start: budget ${BUDGET:-none} s, families $FAMILIES ${LADDER} ${SMOKE:+(cpu smoke)}"
if [[ -z $SMOKE ]]; then
  install_wheels || exit 1
  check_device || { log "no usable CUDA device"; exit 1; }
fi
status=0
IFS=, read -r -a family_list <<<"$FAMILIES"
for family in "${family_list[@]}"; do
  run_family "$family" || status=1
done
if [[ -z $SMOKE ]]; then
  "$PY" bench/gpu_pipeline.py --write-doc && [[ -n $OUT_DIR ]] && cp docs/gpu.md "$OUT_DIR/gpu.md"
fi
[[ -n $OUT_DIR && -f $JSON ]] && cp "$JSON" "$OUT_DIR/"
log "end: exit $status"
exit "$status"
