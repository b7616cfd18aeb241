#!/usr/bin/env bash
# There, on a GPU machine: install the carried wheels (.whl/, from scripts/gpu_bundle.sh) beside the machine's own
# torch and Triton, then run benchmarks/gpu_check.py (at most 8 minutes). Results go to $OUT when it is set (the
# device tool's folder), else to benchmarks/results/gpu/. Extra arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ]; then
    $PYTHON -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The C++ CPU kernels are not what this checks: no compiler run there.
export DSLA_HF_CPP_KERNEL=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
timeout 540 $PYTHON benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/gpu}" "$@"
