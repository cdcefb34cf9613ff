#!/usr/bin/env bash
# One CUDA GPU, under 8 minutes: the CUDA-marked tests, then the G1/G2 head benchmarks of spec/perf.md §7.2.
#   bash benchmarks/gpu.sh            (from the repository root; uses .venv if present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh needs a CUDA GPU; this torch ({torch.__version__}) sees none")
PYEOF
echo "== CUDA-marked tests"
timeout 120 "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider
echo "== G1: head forward + backward"
timeout 240 "$PY" benchmarks/heads_gpu.py --rounds 5
echo "== G2: largest C that trains one step at B = 512"
timeout 170 "$PY" benchmarks/heads_gpu.py --largest-c --budget-s 150
