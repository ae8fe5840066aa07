#!/usr/bin/env bash
# The CUDA check of issue 7: TrOPD steps on one GPU (s/step, tokens/s, peak memory), then `pytest -m gpu`.
# Usage: bash benchmarks/gpu_check.sh [--steps N] [--batch-size B] [--max-new-tokens T] [--larger TEACHER STUDENT]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
