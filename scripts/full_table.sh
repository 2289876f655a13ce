#!/usr/bin/env bash
# The full table: every method, seeds 0..2, all three shared datasets, at the meta-training
# budget of the quick table (150 steps of meta-batch 4 per meta-trained configuration,
# compiled). The datasets run as three one-thread processes at once (the learner's small
# operations gain more from separate processes than from threads, and three keep both of
# this machine's cores busy to the end). Tables land in results/full/<dataset>/results.{md,json};
# logs in $log_dir.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh cpu,train
data_dir=${S2META_DATA_DIR:-../shared/data/amazon-lastfm}
log_dir=${S2META_LOG_DIR:-${TMPDIR:-/tmp}/s2meta-full-table}
mkdir -p "$log_dir"
methods=random,itempop,mf_dot,mf_pop_blend,mf_finetune,finetune,general,s2meta
methods=$methods,s2meta_interaction,s2meta_mapping,s2meta_hybrid,randinit,fixedlr,fixedstep,maml
export data_dir log_dir methods OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
printf '%s\n' Sports_and_Outdoors Beauty LastFM | xargs -P 3 -I{} bash -c '
  .venv/bin/s2meta evaluate --data "$data_dir/{}" --out "results/full/{}" --seeds 3 \
    --methods "$methods" --meta-steps 150 --valid-every 50 --meta-batch 4 --compile \
    > "$log_dir/{}.log" 2>&1 && echo "{}: done" || { echo "{}: failed, see $log_dir/{}.log"; exit 255; }'
