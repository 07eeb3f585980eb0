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
    # PyPI's Linux torch wheel brings CUDA libraries: the environment takes about 6 GB.
    free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
    if [ "${free_kib:-0}" -lt 7000000 ]; then
        echo "[python-env] error: about 7 GB of free disk space is needed in $(pwd) for .venv;" \
            "$((free_kib / 1024 / 1024)) GB is free" >&2
        exit 1
    fi
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q --no-cache-dir -r "$requirements"
    cp "$requirements" "$stamp"
else
    echo "[python-env] .venv is up to date"
fi
