#!/usr/bin/env bash
# The baseline table (docs/results.md): for each shared dataset, prepare the scenario
# benchmark (splits + pretrained embeddings, cached) and evaluate the baselines over seeds
# 0..2 on the meta-test scenarios; tables land in results/<dataset>/results.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh cpu,train
data_dir=${S2META_DATA_DIR:-../shared/data/amazon-lastfm}
for stem in Beauty Sports_and_Outdoors LastFM; do
  .venv/bin/s2meta prepare --data "$data_dir/$stem"
  .venv/bin/s2meta evaluate --data "$data_dir/$stem" --out "results/$stem" --seeds 3
done
