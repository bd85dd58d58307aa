#!/usr/bin/env bash
# The one command for the GPU figures of docs/gpu.md (issue 16), on an H100/H200 machine:
#
#   bench/gpu_run.sh                 # every family; JSON in bench/results/gpu_pipeline.json
#   bench/gpu_run.sh --families sdxl # extra arguments go to bench/gpu_pipeline.py
#
# It installs what the machine lacks (diffusers, pydantic: the bench needs neither Ray nor the
# ingress) from wheels in .whl/ when that folder exists (a machine without internet), else
# from PyPI, then runs bench/gpu_pipeline.py and rewrites docs/gpu.md's measured section.
# To fetch the wheels on a machine with internet first:  bench/gpu_run.sh --download-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
        typing-inspection==0.4.2 importlib-metadata==10.2.0 zipp==4.1.2)

if [[ "${1:-}" == "--download-wheels" ]]; then
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  exit 0
fi

if ! "$PY" -c "import diffusers, pydantic" 2>/dev/null; then
  if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    "$PY" -m pip install -q "${WHEELS[@]}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
"$PY" bench/gpu_pipeline.py "$@"
"$PY" bench/gpu_pipeline.py --write-doc
