#!/usr/bin/env bash
# Fail (exit 1) if the committed peer/v1 generated code differs from a fresh scripts/gen_protos.sh run.
# Compares directories, not git state, so it also works on uncommitted trees and in sdists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$ROOT/scripts/gen_protos.sh" "$TMP/fresh"

# Only generated files take part: __init__.py and caches are ours, not protoc's.
mkdir -p "$TMP/committed" "$TMP/generated"
shopt -s nullglob
for f in "$ROOT"/peer/v1/*_pb2*.py "$ROOT"/peer/v1/*_pb2*.pyi; do cp "$f" "$TMP/committed/"; done
for f in "$TMP"/fresh/peer/v1/*_pb2*.py "$TMP"/fresh/peer/v1/*_pb2*.pyi; do cp "$f" "$TMP/generated/"; done

if ! diff -ru "$TMP/committed" "$TMP/generated" >"$TMP/diff.txt"; then
  cat "$TMP/diff.txt" >&2
  echo "check_protos: peer/v1 generated code is stale or hand-edited; run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
echo "check_protos: peer/v1 generated code is up to date"
