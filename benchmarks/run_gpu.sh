#!/usr/bin/env bash
# Runs rasfx's GPU benchmarks on a machine with torch (+ triton) but without rasfx's other
# dependencies: wheels carried in .whl/ (diffusers) are installed into /tmp/site first.
#   bash benchmarks/run_gpu.sh OUTDIR [bench_models args...]
# Without bench_models args: every model, CUDA graph and compiled, all ratios (tens of minutes:
# each compiled shape takes 30-80 s to compile on these models).
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
if [ $# -eq 0 ]; then
  set -- --models sd3,flux,pixart,lumina,wan --modes cuda_graph,compile+cuda_graph --budget-s 100000
fi
python3 benchmarks/bench_models.py --out "$out/perf.json" "$@" 2>&1 | tee "$out/perf.log"
python3 benchmarks/report.py "$out/perf.json" --md "$out/perf.md" --plot "$out/perf.png"
