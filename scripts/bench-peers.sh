#!/usr/bin/env bash
# Benchmarks curv against PyTorch eager and JAX jit on this machine, in one run (see
# benches/peers.py). Not a test: it prints measurements and ratios. Arguments go to peers.py:
# `--only kronecker` times the Kronecker family (Shampoo, SOAP, K-FAC, Muon, ...) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/python-env.sh
# Peers of the Kronecker part that the oracle tests do not need: heavyball (SOAP, Muon, PSGD-Kron)
# and kfac-jax (about 65 MB with its dependencies). peers.py leaves out a peer that is missing.
.venv/bin/python -m pip install -q pillow heavyball kfac-jax || echo "[bench] heavyball or kfac-jax did not install; their peers are left out"
cargo build --release -p curv-cli
CURV="$PWD/target/release/curv" .venv/bin/python benches/peers.py "$@"
