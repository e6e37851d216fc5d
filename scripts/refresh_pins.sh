#!/usr/bin/env bash
# Move the tested dependency versions: resolve the newest releases into a fresh venv, run the whole suite
# against them, and only if it passes rewrite constraints.txt (every installed distribution, pinned) and print
# the ranges to copy into prefopt/versions.py (TESTED) and pyproject.toml. torch stays at the version given
# (default 2.13.0: the CPU build this project's machines carry; a newer torch from PyPI is a multi-GB CUDA build).
#
#   bash scripts/refresh_pins.sh               # torch 2.13.0
#   TORCH=2.14.1 bash scripts/refresh_pins.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0}
VENV=${VENV:-.venv-refresh}
rm -rf "$VENV"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q "torch==$TORCH" ninja setuptools wheel
pip install -q --no-build-isolation -e ".[test]" "torch==$TORCH"
python -m pytest -q
{
  echo "# The dependency versions the test suite last passed with (README's test command installs them)."
  echo "# Regenerate with scripts/refresh_pins.sh; keep prefopt/versions.py (TESTED) and pyproject.toml in step."
  pip freeze --exclude-editable | grep -v '^prefopt' | sed -E 's/^torch==([^+]*)\+.*/torch==\1/' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt rewritten; tested versions of the declared dependencies:"
python - <<'PY'
from prefopt.versions import TESTED, installed_version
for dist in TESTED:
    print(f"  {dist:<14} {installed_version(dist)}")
PY
