#!/usr/bin/env bash
# The GPU checks, for a session lent a GPU machine: one device call each (10 minutes at most).
#
#   bash benchmarks/gpu_session.sh tests   # pytest -m gpu: CuPy vs NumPy, torchvision, determinism, 2**31
#   bash benchmarks/gpu_session.sh bench   # deformarray bench --backend cupy: GPU rows, JSON, table, chart
#   bash benchmarks/gpu_session.sh all     # both, one after the other
#
# It runs from the repository root without installing anything (PYTHONPATH), because the
# GPU machine has no network but its image already holds every dependency (numpy, numba,
# threadpoolctl, cupy, ml_dtypes, torch, torchvision, jax, pytest, hypothesis). The logs
# go to $OUT (the device tool's folder that comes back) or to ./gpu-out. The exit status
# is non-zero if a test or a deformarray call failed.
set -uo pipefail

what=${1:-all}
case $what in
  tests | bench | all) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh [tests|bench|all]" >&2; exit 2 ;;
esac
out=${OUT:-gpu-out}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  git rev-parse HEAD 2>/dev/null || echo "commit: no .git in this copy"
  "$py" -m deformarray.cli info
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

status=0
if [[ $what != bench ]]; then
  # -rfEs: a line per failure, error and skip (a skipped gpu test on a GPU machine is news)
  "$py" -m pytest -m gpu -q -p no:cacheprovider -rfEs --durations=10 tests 2>&1 | tee "$out/pytest_gpu.log" | tail -60
  status=$((status | PIPESTATUS[0]))
fi
if [[ $what != tests ]]; then
  "$py" -m deformarray.cli bench --backend cupy --repeat 9 --json --plot "$out/bench_gpu.png" \
    > "$out/bench_gpu.json" 2> "$out/bench_gpu.err"
  status=$((status | $?))
  tail -5 "$out/bench_gpu.err"
  # the table, from the JSON (one run gives both)
  "$py" -c 'import json, sys; from deformarray.bench.report import format_report; print(format_report(json.load(open(sys.argv[1]))))' \
    "$out/bench_gpu.json" | tee "$out/bench_gpu.txt"
fi
exit "$status"
