#!/usr/bin/env bash
# Runs rasfx's GPU benchmarks on a machine with torch (+ triton) but without rasfx's other
# dependencies: wheels carried in .whl/ (diffusers) are installed into /tmp/site first.
#   bash benchmarks/run_gpu.sh OUTDIR [bench_models args...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}; shift || true
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt" || true
python3 benchmarks/bench_models.py --out "$out/perf.json" "$@" 2>&1 | tee "$out/perf.log"
