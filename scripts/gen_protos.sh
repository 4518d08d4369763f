#!/usr/bin/env bash
# Regenerate peer/v1/*_pb2*.py(i) from protos/peer/v1/*.proto (the generated code is committed).
# Usage: scripts/gen_protos.sh [OUT_ROOT]   OUT_ROOT defaults to the repo root; output goes to OUT_ROOT/peer/v1/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_ROOT="${1:-$ROOT}"

if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
  # protoc finds the mypy-protobuf plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH.
  export PATH="$ROOT/.venv/bin:$PATH"
else
  PYTHON="python3"
fi

for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
  if ! command -v "$plugin" >/dev/null 2>&1; then
    echo "gen_protos: $plugin not on PATH; install the dev pins (mypy-protobuf==5.1.0, grpcio-tools==1.85.1)" >&2
    exit 1
  fi
done

mkdir -p "$OUT_ROOT/peer/v1"
cd "$ROOT"
# Relative paths under -Iprotos give the generated files absolute imports (`from peer.v1 import ...`).
"$PYTHON" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT_ROOT" --grpc_python_out="$OUT_ROOT" \
  --mypy_out="$OUT_ROOT" --mypy_grpc_out="$OUT_ROOT" \
  protos/peer/v1/*.proto
