#!/usr/bin/env bash
# The GPU verdict in one command, for a session lent a GPU machine (one device call:
# timeout_s 600, the default budget of 540 s leaves the rest of a 15-minute lease for a rerun).
#
#   bash benchmarks/gpu_session.sh                 # every step, in order, within 540 s
#   bash benchmarks/gpu_session.sh --budget 300    # a shorter deadline (each step capped to what is left)
#   bash benchmarks/gpu_session.sh --dry-run       # CPU stand-ins for the GPU steps (CI: tests/test_gpu_session_dryrun.py)
#   bash benchmarks/gpu_session.sh tests | bench   # only pytest -m gpu / only the timings (the old modes)
#   bash benchmarks/gpu_session.sh --only smoke,torch
#
# Steps (benchmarks/gpu_verdict/harness.py runs them; docs/cuda.md "GPU verdict: one command"):
#   1 env        nvidia-smi, CuPy's config, the TF32 flags, deformarray info, the commit
#   2 smoke      every operator x dtype x backward mode vs float64 CPU references (gpu_verdict/refs.npz)
#   3 torch      the torch adapter: fp32/fp16/bf16, channels_last, side stream, torch.compile, graph capture
#   4 memcheck   compute-sanitizer memcheck on the float32 smoke run (skipped where it is not installed)
#   5 timings    deformarray bench --backend cupy --op conv (CUDA events): ours vs torchvision vs cuDNN,
#                TF32 off and on, deterministic mode, peak memory; JSON in $OUT/5_timings.json
#   6 pytest_gpu pytest -m gpu (per-test timeout where pytest-timeout is installed), the slowest last;
#                first tests/test_jax_gpu.py alone (XLA_PYTHON_CLIENT_PREALLOCATE=false, 120 s at most)
#
# Results in $OUT (the device tool's folder that comes back) or ./gpu-out: summary.txt (rewritten
# after every step), <n>_<step>.log per step, 5_timings.json: 8 files, the most the tool returns.
# Nothing is installed: the GPU machine's image holds numpy, numba, cupy, torch, torchvision,
# ml_dtypes, pytest. The exit status is 0 only if every step passed or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
args=()
case ${1:-} in
  tests) shift; args=(--only pytest_gpu) ;;
  bench) shift; args=(--only env,timings) ;;
  all) shift ;;
esac
exec "${PYTHON:-python3}" benchmarks/gpu_verdict/harness.py "${args[@]}" "$@"
