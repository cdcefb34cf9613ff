#!/usr/bin/env bash
# Creates .venv and installs marginface into it; `--test` adds the test tools.
#
# torch: an unpinned `torch` from PyPI is the multi-GB CUDA build. So:
#   * a torch that the python running this script already has (e.g. your CUDA build) is kept: the venv
#     sees it through --system-site-packages and pip will not replace it;
#   * otherwise, on a machine with an NVIDIA driver, pip installs the default (CUDA) torch;
#   * otherwise the CPU build: torch==2.13.0 from the local wheel cache when the machine has one
#     (PIP_FIND_LINKS), else from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test,onnx]"

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch>=2.1"
  elif ls ${PIP_FIND_LINKS:-/nonexistent}/torch-*+cpu-*.whl >/dev/null 2>&1; then
    # The machine carries a CPU wheel; `==2.13.0` prefers its `+cpu` local version over PyPI's CUDA one.
    $PIP install "torch==2.13.0"
  else
    $PIP install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -q -e ".${extras}"
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
