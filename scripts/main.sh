#!/usr/bin/env bash
# The main job end to end on embedded defaults: prepare a shared dataset (LastFM), pretrain
# its embeddings, meta-train the meta learner on a small budget, publish it into a registry,
# start the service (in-process store), adapt a meta-test scenario over HTTP and print its
# top-n for a user. Everything lands under runs/main/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh cpu,train
data=${S2META_DATA_DIR:-../shared/data/amazon-lastfm}/LastFM
run=runs/main
port=${S2META_PORT:-8000}
steps=${S2META_MAIN_STEPS:-20}
rm -rf "$run" && mkdir -p "$run"

echo "== 1/5 prepare: scenario benchmark and pretrained embeddings"
.venv/bin/s2meta prepare --data "$data"
echo "== 2/5 meta-train ($steps steps per variant; the best on meta-valid is the default)"
# --protocol evaluation: the demo marks a meta-test user's held-out items, which only the
# evaluation protocol holds out (the serving default trains on them; docs/protocol.md).
.venv/bin/s2meta train --data "$data" --out "$run/artifact" --meta-steps "$steps" \
  --protocol evaluation
echo "== 3/5 publish"
version=$(.venv/bin/s2meta publish "$run/artifact" --registry "$run/registry")
echo "published $version"

echo "== 4/5 serve on 127.0.0.1:$port (log: $run/serve.log)"
S2META_REGISTRY="$run/registry" .venv/bin/s2meta serve --port "$port" > "$run/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
ready() {
  .venv/bin/python -c "import sys, urllib.request
sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=2).read().decode())"
}
for _ in $(seq 1 180); do
  if ready > /dev/null 2>&1; then break; fi
  if ! kill -0 $server 2>/dev/null; then cat "$run/serve.log"; exit 1; fi
  sleep 1
done
ready && echo

echo "== 5/5 adapt a meta-test scenario over HTTP and recommend"
.venv/bin/python scripts/demo_client.py --url "http://127.0.0.1:$port" \
  --artifact "$run/registry/versions/$version" --data "$data"
