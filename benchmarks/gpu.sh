#!/usr/bin/env bash
# Prepared for a lent GPU machine, under 5 minutes once installed: the adaptation benchmark
# on the device (1,024 scenarios in one batch), and with the service on the device the serving
# benchmark (5 s per run at 1, 32 and 128 connections) and re-adaptation after a hot reload
# (1,024 scenarios, batches of 1 and 256). Figures land in benchmarks/results/*_<device>.json
# and, when $OUT is set, there too, each as soon as it is written. The device is
# $S2META_DEVICE, default cuda; cpu rehearses the script on a machine without a GPU.
#
# Python, in this order:
# - with .gpu/ (`python -m scripts.gpu_bundle` made it on a machine with the package index;
#   the device tool carries it): $S2META_PYTHON or python3, the image's interpreter with
#   PyTorch, plus the bundle's wheels, data and redis-server; this is the lent machine's way,
#   as it can fetch nothing;
# - else $S2META_PYTHON when set (an interpreter that already has s2meta's dependencies);
# - else .venv with the gpu extra.
# The service benchmarks need redis-server (the bundle's, else PATH's); without one they are
# skipped, said so.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${S2META_DEVICE:-cuda}
python=
if [ -d .gpu ]; then
  python=${S2META_PYTHON:-python3}
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
    .gpu/wheels/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$PWD/.gpu/redis:$PATH
  export S2META_DATA_DIR=$PWD/.gpu/data
  S2META_GIT_SHA=$(cat .gpu/COMMIT)
  export S2META_GIT_SHA
elif [ -n "${S2META_PYTHON:-}" ]; then
  python=$S2META_PYTHON
fi
if [ -n "$python" ]; then
  # The project itself, for the `s2meta` command beside that interpreter (no index needed).
  "$python" -m pip install --quiet --no-deps --no-build-isolation -e .
else
  source scripts/venv.sh gpu,train,dev
  python=.venv/bin/python
fi
"$python" -c "import torch; print('gpu.sh: torch', torch.__version__, 'on', '$device',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
export S2META_DEVICE=$device
# Each result goes to $OUT as soon as it is written: a run stopped at the device's time limit
# still brings back what it finished.
keep() {
  if [ -n "${OUT:-}" ]; then cp "benchmarks/results/$1.json" "$OUT/"; fi
  echo "gpu.sh: $1 done at ${SECONDS} s"
}
"$python" -m benchmarks.adaptation_speed --device "$device" --batch-scenarios 1024 --repeats 20
keep "adaptation_speed_$device"
if command -v redis-server >/dev/null; then
  "$python" -m benchmarks.serving_load --seconds 5 --levels 1,32,128 --name "serving_load_$device"
  keep "serving_load_$device"
  "$python" -m benchmarks.readapt --scenarios 1024 --batches 1,256 --name "readapt_$device"
  keep "readapt_$device"
else
  echo "gpu.sh: no redis-server: the service benchmarks are skipped" >&2
fi
