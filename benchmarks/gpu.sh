#!/usr/bin/env bash
# Prepared for a lent GPU machine (under 5 minutes): install, then the adaptation speed
# benchmark on CUDA with 1,024 scenarios in one batch. Figures land in $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh gpu
.venv/bin/python -m benchmarks.adaptation_speed --device cuda --batch-scenarios 1024 --repeats 20
if [ -n "${OUT:-}" ]; then cp benchmarks/results/adaptation_speed_cuda.json "$OUT/"; fi
