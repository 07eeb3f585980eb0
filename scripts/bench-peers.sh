#!/usr/bin/env bash
# Benchmarks curv against PyTorch eager and JAX jit on this machine, in one run (see
# benches/peers.py). Not a test: it prints measurements and ratios. Arguments go to peers.py:
# `--only kronecker` times the Kronecker family (Shampoo, SOAP, K-FAC, Muon, ...) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/python-env.sh
.venv/bin/python -m pip install -q pillow
cargo build --release -p curv-cli
CURV="$PWD/target/release/curv" .venv/bin/python benches/peers.py "$@"
