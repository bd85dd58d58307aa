#!/usr/bin/env bash
# Do the wheels bench/gpu_run.sh carries (bench/gpu_wheels.txt) work on the lent GPU machine?
# (issue 23) Checked here, with PyPI, in a Python 3.12 venv holding that machine's versions
# (docs: /work/shared/DESIGN.md; torch 2.11, transformers 5.17, huggingface_hub 1.33, tokenizers
# 0.23, safetensors 0.8, accelerate 1.15, peft), without what it lacks (diffusers, pydantic, and
# Pillow and requests, which nothing there needs) and with a typing_extensions older than
# pydantic-core needs:
#
#   1. the wheels are downloaded as `bench/gpu_run.sh --download-wheels` does;
#   2. they install with pip's --no-index --no-deps --target, as gpu_run.sh installs them there;
#   3. with that folder first on PYTHONPATH, diffusers, pydantic and the three families'
#      pipelines import, and so do this benchmark's modules;
#   4. bench/gpu_pipeline.py runs there: the FLOP count (meta device) and a CPU smoke run of the
#      tiny SDXL with its optimisations ladder (fp16-safe VAE included).
#
#   bench/check_gpu_wheels.sh        # about 3 GB downloaded the first time (PyPI's torch 2.11 is
#                                    # a CUDA build: 5 GB in the venv; it imports without a GPU)
#
# Not in the test suite: it needs the network and minutes. GPU_WHEELS_CHECK_DIR (default
# /tmp/gpu-wheels-check) keeps the venv between runs.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${GPU_WHEELS_CHECK_DIR:-/tmp/gpu-wheels-check}
MACHINE=(torch==2.11.0 transformers==5.17.0 huggingface_hub==1.33.0 'tokenizers==0.23.*' safetensors==0.8.0
  accelerate==1.15.0 peft)
# Pulled in by the packages above here, absent there (or maybe absent: gpu_run.sh carries them).
ABSENT=(pydantic pydantic-core annotated-types typing-inspection requests urllib3 charset-normalizer pillow)
OLD_TYPING_EXTENSIONS=typing_extensions==4.12.2 # torch 2.11 takes >= 4.10; pydantic-core 2.46 needs 4.14

find_python312() {
  local candidate
  for candidate in "${PY312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [[ -n $candidate ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python 3.12 found: set PY312" >&2
  return 1
}

machine_venv() {
  local venv=$WORK/venv
  if [[ ! -x $venv/bin/python ]]; then
    "$(find_python312)" -m venv "$venv"
    "$venv/bin/pip" install -q "${MACHINE[@]}"
  fi
  "$venv/bin/pip" uninstall -q -y "${ABSENT[@]}" 2>&1 | grep -v -i "not installed" || true
  "$venv/bin/pip" install -q --no-deps "$OLD_TYPING_EXTENSIONS"
  "$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import sys

want = {"torch": "2.11.", "transformers": "5.17.", "huggingface_hub": "1.33.", "tokenizers": "0.23.",
        "safetensors": "0.8.", "accelerate": "1.15.", "typing_extensions": "4.12."}
got = {name: md.version(name) for name in want}
assert sys.version_info[:2] == (3, 12), sys.version
assert all(got[name].startswith(prefix) for name, prefix in want.items()), got
for name in ("diffusers", "pydantic", "PIL", "requests"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is installed: the venv must lack it, as the GPU machine does")
print("the GPU machine's versions:", sys.version.split()[0], got)
EOF
}

echo "== a Python 3.12 venv with the GPU machine's versions ($WORK/venv)"
machine_venv
PY=$WORK/venv/bin/python

echo "== the carried wheels, downloaded as gpu_run.sh --download-wheels does"
rm -rf "$WORK/wheels" "$WORK/site"
GPU_WHEELS=$WORK/wheels PYTHON=$PY bench/gpu_run.sh --download-wheels 2>&1 | grep -v -i "ignored\|^ *$" || true
ls "$WORK/wheels"

echo "== installed with --no-index --no-deps --target"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WORK"/wheels/*.whl

echo "== imports"
export PYTHONPATH="$WORK/site:$PWD" HF_HUB_OFFLINE=1 CHECK_SITE="$WORK/site"
"$PY" - <<'EOF'
import os
import sys

import typing_extensions

# The carried one, ahead of the machine's older one.
assert typing_extensions.__file__.startswith(os.environ["CHECK_SITE"]), typing_extensions.__file__
assert hasattr(typing_extensions, "Sentinel"), "pydantic-core needs typing_extensions.Sentinel"
import diffusers
import pydantic
import torch
import transformers
from diffusers import AutoencoderKL, FluxPipeline, QwenImagePipeline, StableDiffusionXLPipeline  # noqa: F401

sys.path.insert(0, "bench")
import full_size  # noqa: F401
import gpu_pipeline  # noqa: F401

from deployments.optimisations import BucketedCompile  # noqa: F401
from deployments.pipeline_loader import assemble_pipelines  # noqa: F401
from serve_app.config import load_app_config

load_app_config("serve_config.gpu.yaml")
print("imports:", "torch", torch.__version__, "transformers", transformers.__version__, "diffusers",
      diffusers.__version__, "pydantic", pydantic.VERSION, "typing_extensions from", typing_extensions.__file__)
EOF

echo "== bench/gpu_pipeline.py in that environment"
"$PY" bench/gpu_pipeline.py --count-flops --families sdxl --out "$WORK/flops.json"
"$PY" bench/gpu_pipeline.py --cpu-smoke --families sdxl --ladder --repeats 1 --batch-sizes 1 --out "$WORK/smoke.json" \
  2>&1 | grep -v "torchvision" | tail -12
echo "== ok: the carried wheels install and import with the GPU machine's versions"
