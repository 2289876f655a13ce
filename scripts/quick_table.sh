#!/usr/bin/env bash
# A quick table of every method: seed 0 only, 150 meta-training steps of meta-batch 4 per
# meta-trained configuration (`--compile`), one dataset after another. The three-seed table
# is scripts/full_table.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh cpu,train
data_dir=${S2META_DATA_DIR:-../shared/data/amazon-lastfm}
methods=random,itempop,mf_dot,mf_pop_blend,mf_finetune,finetune,general,s2meta
methods=$methods,s2meta_interaction,s2meta_mapping,s2meta_hybrid,randinit,fixedlr,fixedstep,maml
for stem in Beauty LastFM Sports_and_Outdoors; do
  .venv/bin/s2meta evaluate --data "$data_dir/$stem" --out "results/quick/$stem" --seeds 1 \
    --methods "$methods" --meta-steps 150 --valid-every 50 --meta-batch 4 --compile
done
