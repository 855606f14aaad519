#!/usr/bin/env bash
# Create .venv and install Lattice with its development extras (idempotent, fast when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Lattice needs Python 3.11+; $PY is $("$PY" --version 2>&1)" >&2; exit 1
fi
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml constraints-dev.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "setup: installing lattice[dev,all] into .venv (torch, tensorflow-cpu, jax, operator, s3, service) (torch pinned by constraints-dev.txt)" >&2
.venv/bin/python -m pip install -q -c constraints-dev.txt -e '.[dev,all]'
echo "$want" > "$stamp"
