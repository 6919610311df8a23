#!/usr/bin/env bash
# Create (or update) the export toolchain's virtual environment at <repo>/.venv. Idempotent: re-running only
# installs what is missing or at a different version.
#   bash onnx/setup_venv.sh            # uses python3 from PATH
#   PYTHON=python3.11 bash onnx/setup_venv.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$root/onnx/requirements.txt"
"$venv/bin/python" -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
