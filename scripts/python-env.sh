#!/usr/bin/env bash
# Creates (once) and updates the Python virtual environment the oracle tests run in: PyTorch and
# pytorch_optimizer carry the reference implementations curv's optimizers are checked against.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[python-env] creating .venv"
    "$python" -m venv .venv
fi
requirements=tests/oracle/requirements.txt
stamp=.venv/.requirements-installed
if [ ! -f "$stamp" ] || ! cmp -s "$requirements" "$stamp"; then
    echo "[python-env] installing $(tr '\n' ' ' < "$requirements")"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r "$requirements"
    cp "$requirements" "$stamp"
else
    echo "[python-env] .venv is up to date"
fi
