# Create or reuse .venv and install peer into it, idempotently. Sourced by scripts/demo and scripts/test.
#   TORCH_VERSION  torch version to pin (default 2.13.0, a CPU wheel on our machines); "none" skips the pin
#   PEER_VENV      where the virtual environment lives (default: .venv in the repository)
#   PYTHON         the interpreter that creates it (default: python3, which must be 3.11 or newer)
# Usage: peer_setup EXTRAS   (e.g. "test" or "" for none)
set -euo pipefail

PEER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER_VENV="${PEER_VENV:-$PEER_ROOT/.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

peer_setup() {
  local extras="${1:-}"
  local python="${PYTHON:-python3}"
  if [ ! -x "$PEER_VENV/bin/python" ]; then
    "$python" -c 'import sys; assert sys.version_info >= (3, 11), "peer needs Python 3.11 or newer"' || {
      echo "scripts: $python is older than 3.11; set PYTHON=/path/to/python3.11" >&2; return 1; }
    echo "scripts: creating $PEER_VENV" >&2
    "$python" -m venv "$PEER_VENV"
  fi
  local py="$PEER_VENV/bin/python"
  # Reinstall only when something that decides the install changed: the pin, the extras or pyproject.toml.
  local want
  want="torch=$TORCH_VERSION extras=$extras $(sha256sum "$PEER_ROOT/pyproject.toml" | cut -c1-16)"
  local stamp="$PEER_VENV/.peer-install-$(echo "$extras" | tr -c 'a-z0-9' '_')"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c 'import peer, torch' 2>/dev/null; then
    return 0
  fi
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if [ "$TORCH_VERSION" != "none" ]; then
    if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
      echo "scripts: installing torch==$TORCH_VERSION (set TORCH_VERSION to change it)" >&2
      "$py" -m pip install -q "torch==$TORCH_VERSION"
    fi
  fi
  local target="$PEER_ROOT"
  [ -n "$extras" ] && target="$PEER_ROOT[$extras]"
  echo "scripts: installing peer${extras:+ with [$extras]} into $PEER_VENV" >&2
  "$py" -m pip install -q -e "$target"
  echo "$want" > "$stamp"
}
