# Sourced by the other scripts: create .venv if missing and install the project into it with
# the extras named in $1 (e.g. "cpu" or "cpu,dev"). torch is pinned in pyproject.toml.
set -euo pipefail
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
echo "installing s2meta[$1] into .venv ..."
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$1]"
