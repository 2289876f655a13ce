#!/usr/bin/env bash
# Prepared for a lent GPU machine, under 5 minutes once installed: the adaptation benchmark
# on CUDA (1,024 scenarios in one batch), and with the service on CUDA the serving benchmark
# (5 s per run at 1, 32 and 128 connections) and re-adaptation after a hot reload (1,024
# scenarios, batches of 1 and 256). Figures land in benchmarks/results/*_cuda.json
# and, when $OUT is set, there too.
#
# Python: $S2META_PYTHON when set (an interpreter that already has s2meta's dependencies,
# faiss-gpu among them, e.g. a machine with no package index), else .venv with the gpu extra.
# The serving benchmark needs redis-server on PATH; without it that part is skipped, said so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${S2META_PYTHON:-}" ]; then
  python=$S2META_PYTHON
  # The project itself, for the `s2meta` command beside that interpreter (no index needed).
  "$python" -m pip install --quiet --no-deps --no-build-isolation -e .
else
  source scripts/venv.sh gpu,train,dev
  python=.venv/bin/python
fi
export S2META_DEVICE=cuda
"$python" -m benchmarks.adaptation_speed --device cuda --batch-scenarios 1024 --repeats 20
results=(benchmarks/results/adaptation_speed_cuda.json)
if command -v redis-server >/dev/null; then
  "$python" -m benchmarks.serving_load --seconds 5 --levels 1,32,128 --name serving_load_cuda
  "$python" -m benchmarks.readapt --scenarios 1024 --batches 1,256 --name readapt_cuda
  results+=(benchmarks/results/serving_load_cuda.json benchmarks/results/readapt_cuda.json)
else
  echo "gpu.sh: no redis-server on PATH: the service benchmarks are skipped" >&2
fi
if [ -n "${OUT:-}" ]; then cp "${results[@]}" "$OUT/"; fi
