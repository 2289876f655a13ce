#!/usr/bin/env bash
# The test command: install the project with its dev extras, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh cpu,train,dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
