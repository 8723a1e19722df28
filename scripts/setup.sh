#!/usr/bin/env bash
# Prepare a development/CI machine (Debian 12, root): .venv with the package in editable
# mode plus test tools, then the real peers for the interop tests.
# Idempotent and quick on re-run: pip runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'setup: %s\n' "$*"; }
PYTHON=${PYTHON:-python3}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

make_venv() {
  "$PYTHON" -m venv .venv
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
  rm -rf .venv
  log "creating .venv with $("$PYTHON" --version 2>&1)"
  if ! make_venv >/tmp/vhostuser-venv.err 2>&1; then
    # Debian's python3 lacks ensurepip until python3-venv is installed.
    log "python3 -m venv failed ($(tail -n1 /tmp/vhostuser-venv.err)); installing python3-venv"
    rm -rf .venv
    as_root apt-get -o DPkg::Lock::Timeout=600 update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
      install -y -q --no-install-recommends python3-venv
    make_venv
  fi
  rm -f /tmp/vhostuser-venv.err
fi

stamp=.venv/.vhostuser-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && .venv/bin/python -c 'import importlib.metadata as m; [m.version(d) for d in ("vhostuser", "pytest", "mypy", "hypothesis", "ruff")]' >/dev/null 2>&1 \
   && [ -x .venv/bin/ruff ]; then
  log ".venv up to date"
else
  log "pip install -e '.[test]'"
  .venv/bin/python -m pip install -q -e '.[test]'
  printf '%s\n' "$want" >"$stamp"
fi

bash scripts/install-peers.sh
log "done"
