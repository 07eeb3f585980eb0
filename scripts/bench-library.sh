#!/usr/bin/env bash
# Times the optimizer step of `curv build --lib` libraries against torch.optim.Adam on the same
# tensors, in one run (see benches/library.py). Not a test: it prints measurements and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/python-env.sh
cargo build --release -p curv-cli
CURV="$PWD/target/release/curv" .venv/bin/python benches/library.py "$@"
