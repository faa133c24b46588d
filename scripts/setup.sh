#!/usr/bin/env bash
# Set up skd on a fresh machine: torch first (the CPU wheel 2.13.0 when torch is absent, so that
# pip never pulls a multi-GB CUDA build), then the project with its test extras, pinned to the torch
# that is now installed so that resolving the project's dependencies can never replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip --disable-pip-version-check)
# pip 23's resolver (what python 3.11's venv brings) backtracks for many minutes over the boto3 /
# botocore / aiobotocore pins of the S3 extras; pip 24+ resolves the same set in seconds
"${PIP[@]}" install --quiet --root-user-action=ignore --upgrade "pip>=24"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" install --quiet --root-user-action=ignore "torch==2.13.0"
fi
torch_version() { "$PY" -c "import importlib.metadata as m; print(m.version('torch'))"; }
before=$(torch_version)
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==${before}" >"$pin"
"${PIP[@]}" install --quiet --root-user-action=ignore -c "$pin" -e ".[test]"
after=$(torch_version)
if [ "$after" != "$before" ]; then
  echo "error: the project install replaced torch ${before} with ${after}; reinstall with: $PY -m pip install torch==${before}" >&2
  exit 1
fi
echo "skd set up with torch ${after}"
