#!/usr/bin/env bash
# A/B of the fused GeMM kernels: the same bench_kernels.py cases from an older tree and from this
# one, alternating, on one card in one call (kernel timings drift between machines and runs).
#   git archive REV rasfx benchmarks | tar -x -C outputs/baseline     # the "before" tree
#   bash benchmarks/run_kernels_ab.sh outputs/baseline OUTDIR [bench_kernels args...]
# Writes OUTDIR/{before,after}_N.md (N = repetition) and OUTDIR/card.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; out=$2; shift 2
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt" || true
export PYTHONUNBUFFERED=1
for rep in 1 2; do
  (cd "$base" && python3 benchmarks/bench_kernels.py "$@" --out "$OLDPWD/$out/before_$rep.md") 2>&1 | tail -3
  python3 benchmarks/bench_kernels.py "$@" --out "$out/after_$rep.md" 2>&1 | tail -3
done
