#!/usr/bin/env bash
# Sets up the machine (see setup.sh), builds curv and runs the main demo on the bundled data:
# the digits MLP is checked, with its parameter, optimizer-state and FLOP summary, and its
# typed IR is printed. Execution (`curv run`) arrives with the next milestone.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p curv-cli
curv=./target/release/curv
echo
echo "== curv check examples/digits_mlp.curv"
"$curv" check examples/digits_mlp.curv
echo
echo "== curv check examples/optimizers/shampoo.curv (Kronecker-factored curvature)"
"$curv" check examples/optimizers/shampoo.curv
echo
echo "== curv emit examples/digits_mlp.curv --stage ir (first 40 lines)"
"$curv" emit examples/digits_mlp.curv --stage ir | head -n 40
echo
echo "== a file with mistakes: every error is reported in one run"
"$curv" check tests/ui/several_syntax_errors.curv || echo "(curv exited with $? as it should for a user error)"
