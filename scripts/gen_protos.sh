#!/usr/bin/env bash
# The one codegen script: protos/disco/v1/*.proto -> protos/disco/v1/*_pb2*.py (imported as disco.v1).
# Never edit the generated files; run this instead. tests/test_protos.py fails when they disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-protos}"
python -m grpc_tools.protoc -I protos --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" protos/disco/v1/*.proto
