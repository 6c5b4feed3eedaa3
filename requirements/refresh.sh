#!/usr/bin/env bash
# Refresh the lock (requirements/ci-py311.txt) to today's newest releases that
# pyproject.toml allows, install it in a throwaway venv and re-pin the golden digests
# under it. Review `git diff` (which versions moved, which outputs changed) and commit
# the lock and tests/golden/ together, saying why. Needs uv (pip install uv) and Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/ci-py311.txt
uv pip compile pyproject.toml --extra cpu --extra test --extra ray --extra scale \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --upgrade -o "$LOCK"
venv=$(mktemp -d)/venv
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q -e '.[cpu,test]' -c "$LOCK"
FACECURATE_GOLDEN_UPDATE=1 "$venv/bin/python" -m pytest -q tests/test_golden.py -rs
"$venv/bin/python" -m pytest -q tests/test_golden.py
rm -rf "$(dirname "$venv")"
git --no-pager diff --stat -- "$LOCK" tests/golden
