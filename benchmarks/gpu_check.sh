#!/usr/bin/env bash
# The GPU check, one script for one H100/H200 (about 6 minutes): the CUDA tests, the
# single-evaluation benchmark at n = 50,000, D = 3,072, B in {16, 64, 256} against the
# two-GEMM and SDPA, and the closed-form trajectory on CIFAR-10 (n = 50,000, 100 steps,
# B = 256). Results, JSON with provenance, go to book/results/gpu/ (or $RESULTS).
#
#   NWFLOW_DATA_DIR=/path/to/data bash benchmarks/gpu_check.sh
#
# Needs a CUDA build of torch and the test extra's pytest and hypothesis; nothing else of the
# book (no Jupyter). The CUDA tests skip on a machine without CUDA, so the script refuses one.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-book/results/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu_check.sh needs a CUDA device'"
python -m pytest -q -p no:cacheprovider -k "cuda" --junitxml "$RESULTS/cuda-tests.xml" \
  tests/test_empirical.py tests/test_empirical_reduced.py tests/test_attention.py tests/test_solvers.py \
  tests/test_stream.py
python benchmarks/velocity.py --device cuda --configs 50000,3072,16 50000,3072,64 50000,3072,256 \
  --times 0.1 0.5 0.9 0.999 --out "$RESULTS/velocity-cuda.json"
python benchmarks/trajectory.py --device cuda --batches 256 --steps 100 --out "$RESULTS/trajectory-cuda.json"
