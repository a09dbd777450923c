#!/usr/bin/env bash
# One short run on a GPU machine (JAX with CUDA already installed there, no network):
# the reversal tests on the GPU, the exactness table, the core benchmark at T = 1000 with
# its recomputation floor (float64, float32, and the budget curve), kernels per step, and
# the large run. Results land in $OUT (default benchmarks/results).
# Usage: bash benchmarks/device_check.sh
set -o pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 170 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/test_reversal.py 2>&1 \
    | tee "$OUT/device_tests.log" | tail -15
timeout 90 python3 benchmarks/exactness.py --steps 300 2>&1 | tail -9
timeout 150 python3 benchmarks/core.py --steps 1000 --no-large --name core_gpu 2>&1 | tail -22
timeout 90 python3 benchmarks/core.py --steps 1000 --no-large --methods reversible unrolled \
    --dtype float32 --no-profile --name core_gpu_f32 2>&1 | tail -8
timeout 120 python3 benchmarks/core.py --steps 1000 --no-large --methods unrolled \
    --budgets 0 0.1 0.5 1 --no-profile --name core_gpu_budget 2>&1 | tail -8
timeout 60 python3 benchmarks/kernels.py --name kernels_gpu 2>&1 | tail -8
timeout 120 python3 benchmarks/core.py --no-cells --large-steps 10000 --name core_gpu_large 2>&1 | tail -5
cp benchmarks/results/core_gpu* benchmarks/results/kernels_gpu* benchmarks/results/exactness_* "$OUT/" 2>/dev/null || true
