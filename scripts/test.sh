#!/usr/bin/env bash
# The test command: install the project with its dev extras, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh cpu,train,dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
# The docs: --strict fails on broken links between pages; the site goes to an ignored dir.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir build/site
.venv/bin/python -m pytest "$@"
