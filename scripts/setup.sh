#!/usr/bin/env bash
# Set up skd on a fresh machine: torch first (the CPU wheel 2.13.0 when torch is absent, so that
# pip never pulls a multi-GB CUDA build), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --root-user-action=ignore "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[test]"
