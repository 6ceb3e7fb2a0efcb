#!/usr/bin/env bash
# Regenerate the checked-in Python code for proto/specserve/v1/*.proto into services/specserve/v1/.
# tests/test_proto_codegen.py checks that running this gives exactly the checked-in files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-services}
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  proto/specserve/v1/generation.proto proto/specserve/v1/internal.proto
