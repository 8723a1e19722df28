#!/usr/bin/env bash
# Prepare a development/CI machine (Debian 12, root): a C compiler and Python's headers for
# the compiled burst engine, .venv with the package in editable mode plus test tools, then
# the real peers for the interop tests.
# Idempotent and quick on re-run: pip runs only when pyproject.toml, setup.py or the C
# engine's source changed.
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

# The compiled modules (src/vhostuser/_fastpath.c: the burst engine; _memguard.c: the SIGBUS
# guard for unsealed guest memory) need a C compiler and Python.h; without them pip still
# installs the package, with the pure-Python engine only.
py_include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if ! command -v cc >/dev/null 2>&1 || [ ! -f "$py_include/Python.h" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    log "installing a C compiler and Python headers for the compiled engine"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
      install -y -q --no-install-recommends gcc libc6-dev python3-dev
  else
    log "no C compiler or Python.h: the compiled engine will not be built"
  fi
fi

stamp=.venv/.vhostuser-setup-stamp
want=$(cat pyproject.toml setup.py src/vhostuser/_fastpath.c src/vhostuser/_memguard.c | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && .venv/bin/python -c 'import importlib.metadata as m; [m.version(d) for d in ("vhostuser", "pytest", "mypy", "hypothesis", "ruff")]' >/dev/null 2>&1 \
   && { ! command -v cc >/dev/null 2>&1 || .venv/bin/python -c 'import vhostuser._fastpath, vhostuser._memguard' >/dev/null 2>&1; } \
   && [ -x .venv/bin/ruff ]; then
  log ".venv up to date"
else
  log "pip install -e '.[test]'"
  .venv/bin/python -m pip install -q -e '.[test]'
  printf '%s\n' "$want" >"$stamp"
fi

bash scripts/install-peers.sh
log "done"
