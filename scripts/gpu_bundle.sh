#!/usr/bin/env bash
# Here, before a GPU check: the wheels that a GPU machine with no package registry needs for
# benchmarks/gpu_check.py, into .whl/ (git-ignored; name it in the device run's `carry`): this package, the
# Transformers it is tested with (GPU images often carry an older one), flash-linear-attention's kernels (fla-core,
# for the chunk_gla comparison) and TRL with datasets (the chain stage). Torch, Triton and accelerate are the GPU
# machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
$PYTHON -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir .whl .
$PYTHON -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest .whl "transformers==5.24.0" "fla-core==0.6.0" "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" \
    "multiprocess==0.70.19"
ls -l .whl
