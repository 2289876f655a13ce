#!/bin/sh
# The trainer's job (docker-compose `trainer`, the Kubernetes Job and CronJob): prepare the
# dataset and meta-train (s2meta train), publish into the registry and notify the API
# replicas through Redis (s2meta publish reads S2META_REDIS_URL), so they hot-reload the new
# meta learner.
set -eu
: "${S2META_TRAIN_DATA:?set S2META_TRAIN_DATA to a dataset (a sequence-form stem or a tabular directory)}"
: "${S2META_REGISTRY:?set S2META_REGISTRY to the registry directory}"
work=${S2META_WORK_DIR:-${TMPDIR:-/tmp}/s2meta-train}
artifact="$work/artifact-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$work"
echo "trainer: $S2META_TRAIN_DATA, ${S2META_TRAIN_STEPS:-600} steps per variant on ${S2META_TRAIN_DEVICE:-cpu}"
# train prepares the data itself (cached under S2META_CACHE_DIR).
# shellcheck disable=SC2086  # S2META_TRAIN_ARGS holds several options
s2meta train --data "$S2META_TRAIN_DATA" --out "$artifact" \
  --meta-steps "${S2META_TRAIN_STEPS:-600}" --device "${S2META_TRAIN_DEVICE:-cpu}" \
  ${S2META_TRAIN_ARGS:-}
version=$(s2meta publish "$artifact" --registry "$S2META_REGISTRY")
rm -rf "$artifact"
echo "trainer: published $version into $S2META_REGISTRY"
